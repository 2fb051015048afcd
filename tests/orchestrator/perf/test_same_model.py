"""The benchmark times the model a fold trains: both build it through the same call, fastpath.apply, with the same
placement, and get the same module types and the same torch.compile calls. Prediction loads a fold's model through it
too, placed for prediction."""

import pytest
import torch

from tests.conftest import CONFIGS, DATA
from trainer_core import fastpath
from trainer_core.config import load_config, validate
from trainer_core.data.arena import assign_folds, load_rows
from trainer_core.fold.loop import train_fold

# the fast config's keys on the tiny Gemma-2; auto recomputation is off on the CPU, on/auto alike elsewhere
FAST = ["data.max_rows=60", "data.max_length=64", "model.compile=on", "model.pooled_last_layer=true",
        "model.attn_implementation=block_causal", "lora.shared_dropout=true", "model.dequant_cache=auto",
        "model.persistent_reduction_max=1024", "model.gradient_checkpointing=on", "train.optimizer=adamw"]


class Built(Exception):
    """Raised by the spy once the model is built: nothing after the build needs to run."""


@pytest.fixture
def built(monkeypatch):
    """Spies on fastpath.apply (what the fold, the benchmark and prediction call) and on torch.compile; each build
    is stopped right after apply and recorded as (config, placement, model, steps, compile calls)."""
    records, compiles = [], []
    real_apply, real_compile = fastpath.apply, torch.compile

    def compile_spy(target, *args, **kwargs):
        owner = getattr(target, "__self__", None)
        compiles.append((type(owner).__name__ if owner is not None else target.__qualname__, args,
                         {k: (v if k != "options" else sorted(v or {})) for k, v in kwargs.items()}))
        return real_compile(target, *args, **kwargs)

    def apply_spy(model, cfg, placement):
        compiles.clear()
        speed = real_apply(model, cfg, placement)
        records.append((cfg, placement, model, dict(speed.steps), list(compiles)))
        raise Built

    monkeypatch.setattr(fastpath, "apply", apply_spy)
    monkeypatch.setattr(torch, "compile", compile_spy)
    yield records
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    V.set_choices_handler(InductorChoices())


def test_the_benchmark_builds_what_a_fold_builds(built, tmp_path):
    from orchestrator.perf.step_bench import build_for, our_setup, setup_config

    cfg = load_config(CONFIGS / "smoke.yaml", FAST)
    validate(cfg)
    rows = assign_folds(load_rows(DATA, max_rows=60), 5)
    with pytest.raises(Built):
        train_fold(cfg, 0, rows, tmp_path / "fold")
    device = torch.device("cpu")
    ours = our_setup(cfg, device)
    with pytest.raises(Built):
        build_for(setup_config(cfg, ours), ours, device, cfg.data.max_length, None)
    assert len(built) == 2
    (fold_cfg, fold_place, fold_model, fold_steps, fold_compiles), (bench_cfg, bench_place, bench_model, bench_steps,
                                                                     bench_compiles) = built
    assert fold_cfg.model == bench_cfg.model and fold_cfg.lora == bench_cfg.lora
    assert fold_place == bench_place and fold_place.seq_len == 64 and fold_place.recompute == "on"
    assert fold_steps == bench_steps and list(fold_steps) == ["dequant_cache", "pooled_last_layer", "attention",
                                                              "shared_dropout", "compile", "recompute"]
    assert ([(n, type(m)) for n, m in fold_model.named_modules()]
            == [(n, type(m)) for n, m in bench_model.named_modules()])
    assert fold_compiles == bench_compiles and len(fold_compiles) == 4  # 3 layers and the pooled top layer's function
    assert [c[0] for c in fold_compiles] == ["Gemma2DecoderLayer"] * 3 + ["pooled_layer_forward"]


def test_prediction_loads_a_fold_through_the_same_call(tmp_path, monkeypatch):
    """A finished fold's model for orchestrator.predict: the plain build, the adapters, then fastpath.apply placed
    for prediction (no weight cache, no recomputation, no dropout sharing)."""
    from trainer_core.fold.inference import load_fold_model

    cfg = load_config(CONFIGS / "smoke.yaml", [*FAST, "model.compile=off", "train.max_steps=1"])
    rows = assign_folds(load_rows(DATA, max_rows=60), 5)
    train_fold(cfg, 0, rows, tmp_path / "fold=0")
    calls = []
    real = fastpath.apply
    monkeypatch.setattr(fastpath, "apply", lambda model, c, p: calls.append((c, p)) or real(model, c, p))
    model, _, _ = load_fold_model(cfg, tmp_path / "fold=0" / "adapter", torch.device("cpu"))
    assert len(calls) == 1 and calls[0][1].training is False and calls[0][1].recompute == "off"
    assert list(vars(model)["trainer_core_fastpath"].steps) == ["pooled_last_layer", "attention"]
    fastpath.release(model)
