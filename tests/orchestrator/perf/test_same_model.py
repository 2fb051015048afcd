"""The benchmark times the model a fold trains: both build it through the same call, fastpath.apply, with the same
placement, and get the same module types and the same torch.compile calls. Prediction loads a fold's model through it
too, placed for prediction."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import CONFIGS, DATA
from trainer_core import fastpath
from trainer_core.config import load_config, validate
from trainer_core.data.arena import assign_folds, load_rows
from trainer_core.fastpath.compile import keep_nf4_layout_on_cpu
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
    for prediction (the weight cache beside an inference batch, no recomputation, no dropout sharing); the cached
    weights predict what the nf4 layers predict."""
    from trainer_core.fold.inference import load_fold_model

    cfg = load_config(CONFIGS / "smoke.yaml", [*FAST, "model.compile=off", "train.max_steps=1"])
    rows = assign_folds(load_rows(DATA, max_rows=60), 5)
    train_fold(cfg, 0, rows, tmp_path / "fold=0")
    calls = []
    real = fastpath.apply
    monkeypatch.setattr(fastpath, "apply", lambda model, c, p: calls.append((c, p)) or real(model, c, p))
    model, tok, precision = load_fold_model(cfg, tmp_path / "fold=0" / "adapter", torch.device("cpu"))
    assert len(calls) == 1 and calls[0][1].training is False and calls[0][1].recompute == "off"
    steps = vars(model)["trainer_core_fastpath"].steps
    assert list(steps) == ["dequant_cache", "pooled_last_layer", "attention"]
    assert steps["dequant_cache"].startswith("dequantized weights cached: 4/4 layers")  # auto: room on the CPU
    assert calls[0][1].micro_batch == cfg.train.eval_batch_size  # the batch the cache leaves room for
    from trainer_core.data.tokenization import encode
    from trainer_core.fold.inference import predict_probs
    from trainer_core.model.precision import make_autocast

    # the fold's held-out rows, as the fold predicted them (on its cached weights): the same probabilities
    held = rows[rows["fold"] == 0]
    ids = encode(held, tok, cfg)
    autocast = make_autocast(precision, torch.device("cpu"))
    cached = predict_probs(model, ids, cfg.train.eval_batch_size, tok.pad_token_id, torch.device("cpu"), autocast)
    fastpath.release(model)
    oof = pd.read_parquet(tmp_path / "fold=0" / "oof.parquet").set_index("id").loc[held["id"]]
    np.testing.assert_allclose(cached, oof[["p_a", "p_b", "p_tie"]].to_numpy(), rtol=1e-5, atol=1e-6)
    # and what the nf4 layers compute when they dequantize as training does (bitsandbytes' CPU inference path,
    # which repacks the weights and rounds otherwise, off)
    off = replace(cfg, model=replace(cfg.model, dequant_cache="off"))
    plain, _, _ = load_fold_model(off, tmp_path / "fold=0" / "adapter", torch.device("cpu"))
    assert vars(plain)["trainer_core_fastpath"].steps["dequant_cache"] == ""
    keep_nf4_layout_on_cpu(plain)
    nf4 = predict_probs(plain, ids, cfg.train.eval_batch_size, tok.pad_token_id, torch.device("cpu"), autocast)
    fastpath.release(plain)
    np.testing.assert_allclose(cached, nf4, rtol=1e-5, atol=1e-6)
