"""One typed config tree for a CV run: defaults <- YAML (``--config``) <- dotted overrides
(``train.lr=1e-4``).

Every field has a default and a one-line doc (``doc=`` metadata, shown by ``--help-config``). Unknown keys and values
of the wrong type fail loudly at merge time; cross-field problems are collected by :func:`validate` and reported
together.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from trainer_core.config_schema import (  # noqa: F401 (re-exported: the config API is this module)
    ClusterConfig,
    Config,
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    TrainConfig,
)

BLOCK_CAUSAL = ("block_causal", "block_causal_triton")  # model.attn_implementation values of trainer_core.attention
PERSISTENT_REDUCTION_CAP = 16384  # model.persistent_reduction_max: longer rows would not fit in registers

# ----------------------------------------------------------------------------------------------------------------
# merging


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return value converted to the annotated type tp, or raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        for arm in inner:  # e.g. Union[int, Literal["auto"]]: the first arm that takes the value
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                pass
        names = [" or ".join(map(repr, typing.get_args(a))) if typing.get_origin(a) is Literal
                 else {int: "an integer", float: "a number", str: "a string"}.get(a, str(a)) for a in inner]
        raise ConfigError(f"{key}: expected {' or '.join(names)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML reads on/off/true/false as booleans
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in this file


def _apply(obj: Any, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(prefix + n for n in names))})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping of {key}.* keys, got {v!r}")
            _apply(cur, v, prefix=f"{key}.")
        elif isinstance(cur, dict) and isinstance(v, dict):
            setattr(obj, k, {**cur, **v})  # model.random_config.hidden_size=64 changes one entry
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def parse_override(text: str) -> tuple[str, Any]:
    """``'train.lr=1e-4'`` -> ``('train.lr', 1e-4)``; the value is read as YAML (``null``, ``[a,b]``, ``true``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def nest(dotted: dict) -> dict:
    """``{'train.lr': 1}`` -> ``{'train': {'lr': 1}}``."""
    out: dict = {}
    for key, value in dotted.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def _resolve_relative_paths(raw: dict, base: Path) -> None:
    for section, key in (("data", "path"), ("data", "extra_train_path"), ("train", "soft_labels")):
        part = raw.get(section)
        if isinstance(part, dict) and isinstance(part.get(key), str) and part[key]:
            p = Path(part[key]).expanduser()
            if not p.is_absolute():
                part[key] = str((base / p).resolve())


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults <- YAML file <- overrides. Overrides are 'a.b=v' strings or a dict of dotted keys."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config must be a mapping of sections")
        _resolve_relative_paths(raw, path.resolve().parent)
        try:
            _apply(cfg, raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    if overrides:
        dotted = dict(parse_override(o) for o in overrides) if isinstance(overrides, list) else dict(overrides)
        nested = nest(dotted)
        _resolve_relative_paths(nested, Path.cwd())
        _apply(cfg, nested)
    return cfg


def config_from_dict(d: dict) -> Config:
    cfg = Config()
    _apply(cfg, d)
    return cfg


def apply_overrides(cfg: Config, overrides: dict) -> Config:
    """A copy of ``cfg`` with dotted overrides (``{'train.lr': 1e-4}``) merged in exactly as CLI overrides are: unknown
    keys and wrong types raise ConfigError. Used by sweeps, whose trials are such overrides of one base config."""
    out = copy.deepcopy(cfg)
    _apply(out, nest(dict(overrides)))
    return out


def get_value(cfg: Config, key: str) -> Any:
    """The value at a dotted key (``'lora.r'``); KeyError if there is none."""
    node: Any = cfg
    for part in key.split("."):
        if dataclasses.is_dataclass(node) and part in {f.name for f in dataclasses.fields(node)}:
            node = getattr(node, part)
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(key)
    return node


def compile_options(m: ModelConfig) -> dict:
    """``model.compile_options`` as torch.compile takes them: nested mappings joined into dotted names
    (``{'triton': {'cudagraphs': False}}`` -> ``{'triton.cudagraphs': False}``); a later entry wins over an earlier one
    of the same name (a command-line override over the YAML)."""
    flat: dict = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, f"{name}.")
            else:
                flat[name] = value
    walk(m.compile_options, "")
    return flat


def _compile_option_errors(m: ModelConfig) -> list[str]:
    """Problems with ``model.compile_options``, found before anything starts (torch itself only checks the names when
    the first layer compiles, inside a fold)."""
    options = compile_options(m)
    if not options:
        return []
    errs = [f"model.compile_options.{k}: expected a number, string or true/false, got {v!r}"
            for k, v in options.items() if not isinstance(v, (bool, int, float, str))]
    if options.get("triton.multi_kernel"):
        errs.append("model.compile_options.triton.multi_kernel: refused, it gave wrong gradients in the compiled "
                    "layers (torch 2.11, H200: docs/PERFORMANCE.md, session 9); the persistent softmax rows it "
                    "found come from model.persistent_reduction_max=1024")
    if m.compile == "off":
        errs.append(f"model.compile_options: {sorted(options)} apply to compiled layers; set model.compile on or "
                    "dynamic")
    import torch._inductor  # only here: reading the names torch.compile knows needs torch

    known = set(torch._inductor.list_options())
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        errs.append(f"model.compile_options: unknown torch.compile (inductor) option(s) {', '.join(unknown)}; "
                    f"torch._inductor.list_options() lists the {len(known)} known ones")
    return errs


def validate(cfg: Config) -> None:
    """Cross-field checks; raises ConfigError listing every problem at once."""
    errs = []
    d, m, lo, t, c = cfg.data, cfg.model, cfg.lora, cfg.train, cfg.cluster
    if not d.path:
        errs.append("data.path: no data file given")
    if d.n_folds < 2:
        errs.append(f"data.n_folds: need at least 2 folds, got {d.n_folds}")
    if d.max_rows is not None and d.max_rows < d.n_folds:
        errs.append(f"data.max_rows: {d.max_rows} rows cannot fill {d.n_folds} folds")
    if d.max_length < 8:
        errs.append(f"data.max_length: {d.max_length} is too short to hold a row")
    if d.prompt_share is not None:
        if not 0 < d.prompt_share < 1:
            errs.append(f"data.prompt_share: must be in (0, 1) or null, got {d.prompt_share}")
        if d.truncation != "balanced":
            errs.append(f"data.prompt_share: applies to data.truncation=balanced only (got {d.truncation!r})")
    if not m.name_or_path and m.init == "pretrained":
        errs.append("model.name_or_path: no model given")
    if m.init == "random" and not m.random_config:
        errs.append("model.random_config: init=random needs the architecture (model_type plus its config fields)")
    if m.init == "random" and m.tokenizer is None and not m.name_or_path:
        errs.append("model.tokenizer: init=random without name_or_path needs a tokenizer ('bytes' or a path)")
    if lo.enabled:
        if lo.r < 1:
            errs.append(f"lora.r: must be >= 1, got {lo.r}")
        if lo.alpha < 1:
            errs.append(f"lora.alpha: must be >= 1, got {lo.alpha}")
        if not 0 <= lo.dropout < 1:
            errs.append(f"lora.dropout: must be in [0, 1), got {lo.dropout}")
        if not lo.target_modules:
            errs.append("lora.target_modules: empty")
        if lo.freeze_layers < 0:
            errs.append(f"lora.freeze_layers: must be >= 0, got {lo.freeze_layers}")
    elif m.quantization != "none":
        errs.append(f"lora.enabled=false with model.quantization={m.quantization}: quantized weights cannot be trained")
    if m.fp8_backward and (m.quantization != "nf4" or m.dequant_cache == "off" or t.precision not in ("bf16", "auto")):
        errs.append(f"model.fp8_backward=true runs the backward through the bf16 weights model.dequant_cache keeps: it "
                    f"needs model.quantization=nf4 (got {m.quantization}), model.dequant_cache auto or on (got "
                    f"{m.dequant_cache}) and train.precision bf16 or auto (got {t.precision})")
    errs.extend(_compile_option_errors(m))
    if not 0 <= m.persistent_reduction_max <= PERSISTENT_REDUCTION_CAP:
        errs.append(f"model.persistent_reduction_max: must be in [0, {PERSISTENT_REDUCTION_CAP}] (elements a row keeps "
                    f"in registers), got {m.persistent_reduction_max}")
    elif m.persistent_reduction_max and m.compile == "off":
        errs.append("model.persistent_reduction_max: applies to compiled layers; set model.compile on or dynamic, or "
                    "set it to 0")
    if m.pooled_last_layer:  # a pretrained model that is not a Gemma-2 is refused when built (trainer_core.last_layer)
        needs = [f"model.head=joint (got {m.head})"] if m.head != "joint" else []
        if m.attn_implementation not in ("eager", *BLOCK_CAUSAL):
            needs.append(f"model.attn_implementation eager or block_causal (got {m.attn_implementation})")
        if m.init == "random" and m.random_config.get("model_type", "gemma2") != "gemma2":
            needs.append(f"a Gemma-2 (got random_config.model_type={m.random_config['model_type']})")
        if needs:
            errs.append("model.pooled_last_layer=true computes the top layer only at the last non-pad token, the one "
                        "the joint head reads, from eager attention's mask on a Gemma-2: it needs " + ", ".join(needs))
    if m.attn_implementation in BLOCK_CAUSAL and m.head != "joint":
        errs.append(f"model.attn_implementation={m.attn_implementation} skips the keys a causal decoder masks; "
                    f"model.head={m.head} mean-pools every position of an encoder: use model.head=joint or another "
                    "attention")
    if m.head == "pairwise" and lo.enabled:
        errs.append("model.head=pairwise trains the whole encoder: set lora.enabled=false (adapters are not supported "
                    "with this head yet)")
    if t.epochs <= 0 and t.max_steps is None:
        errs.append(f"train.epochs: must be > 0, got {t.epochs}")
    if t.max_steps is not None and t.max_steps < 1:
        errs.append(f"train.max_steps: must be >= 1, got {t.max_steps}")
    if t.lr <= 0:
        errs.append(f"train.lr: must be > 0, got {t.lr}")
    for name in ("batch_size", "grad_accum", "eval_batch_size", "log_every"):
        if getattr(t, name) != "auto" and getattr(t, name) < 1:
            errs.append(f"train.{name}: must be >= 1, got {getattr(t, name)}")
    if t.warmup_steps < 0:
        errs.append(f"train.warmup_steps: must be >= 0, got {t.warmup_steps}")
    if t.eval_every is not None and t.eval_every < 1:
        errs.append(f"train.eval_every: must be >= 1 or null, got {t.eval_every}")
    if t.interim_eval_rows < 1:
        errs.append(f"train.interim_eval_rows: must be >= 1, got {t.interim_eval_rows}")
    if not 0 <= t.distill_weight <= 1:
        errs.append(f"train.distill_weight: must be in [0, 1], got {t.distill_weight}")
    if t.distill_temperature <= 0:
        errs.append(f"train.distill_temperature: must be > 0, got {t.distill_temperature}")
    if t.checkpoint_every is not None and t.checkpoint_every < 1:
        errs.append(f"train.checkpoint_every: must be >= 1 or null, got {t.checkpoint_every}")
    if c.gpus_per_fold < 0:
        errs.append(f"cluster.gpus_per_fold: must be >= 0, got {c.gpus_per_fold}")
    if c.cpu_workers_per_fold < 1:
        errs.append(f"cluster.cpu_workers_per_fold: must be >= 1, got {c.cpu_workers_per_fold}")
    if c.cpus_per_worker <= 0:
        errs.append(f"cluster.cpus_per_worker: must be > 0, got {c.cpus_per_worker}")
    if c.max_concurrent_folds is not None and c.max_concurrent_folds < 1:
        errs.append(f"cluster.max_concurrent_folds: must be >= 1 or null, got {c.max_concurrent_folds}")
    if c.max_failures < 0:
        errs.append(f"cluster.max_failures: must be >= 0, got {c.max_failures}")
    if c.gpus_per_fold == 0 and m.quantization != "none" and t.precision == "fp16":
        errs.append("train.precision=fp16 needs a GPU; CPU folds (cluster.gpus_per_fold=0) use bf16 or fp32")
    if errs:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errs))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def field_docs() -> list[tuple[str, str, Any]]:
    """(dotted key, doc, default) for every leaf field, for ``--help-config``."""
    out = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
            else:
                out.append((f"{prefix}{f.name}", f.metadata.get("doc", ""), v))

    walk(Config(), "")
    return out
