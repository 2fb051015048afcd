"""Dotted ``key=value`` overrides of a finished run's ``config.yaml`` for ``orchestrator.predict``: a run directory
copied to another machine (a Kaggle notebook, a cluster node) finds its base weights where they sit there
(``model.name_or_path=/kaggle/input/gemma-2-9b``) and predicts with that machine's batch size and precision.

Only keys that do not change what the folds learned may be overridden: where the weights and tokenizer are read from,
and how the forward pass is computed (batch size, precision, compilation and where compiled layers are kept,
attention kernel, memory). Anything else (``lora.r``, ``model.quantization``, ``data.max_length``, ...) would load or
feed the saved adapters differently from how they were trained, and is refused in one line."""

from __future__ import annotations

from pathlib import Path

from trainer_core.config import Config, ConfigError, apply_overrides, load_config, parse_override, validate

PREDICT_KEYS = (
    "model.name_or_path", "model.tokenizer", "model.attn_implementation", "model.compile", "model.compile_options",
    "model.dequant_cache", "model.fp8_predict", "model.persistent_reduction_max", "model.pooled_last_layer",
    "train.eval_batch_size",
    "train.precision", "train.memory_budget_gib", "cluster.compile_cache",
)


def parse_predict_overrides(texts: list[str]) -> dict:
    """``['model.name_or_path=/x']`` -> ``{'model.name_or_path': '/x'}``, checked: not ``key=value``, an unknown key,
    a wrong type or a key outside :data:`PREDICT_KEYS` is a ConfigError of one line."""
    out = {}
    for text in texts:
        key, value = parse_override(text)
        base = key.split(".compile_options.", 1)[0] + (".compile_options" if ".compile_options." in key else "")
        apply_overrides(Config(), {key: value})  # unknown keys and wrong types fail here, as on the cv command line
        if base not in PREDICT_KEYS:
            raise ConfigError(f"{key}: cannot be overridden for prediction (it changes what the folds learned or how "
                              f"their inputs are read); allowed: {', '.join(PREDICT_KEYS)}")
        out[key] = value
    return out


def run_config(run_dir: Path, overrides: dict | None = None) -> Config:
    """The run's resolved ``config.yaml`` with ``overrides`` applied (and the result validated)."""
    cfg = load_config(Path(run_dir) / "config.yaml")
    if overrides:
        cfg = apply_overrides(cfg, overrides)
        validate(cfg)
    return cfg
