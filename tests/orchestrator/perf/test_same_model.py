"""The benchmark times the model a fold trains: both build it through the same call, fastpath.apply, with the same
placement, and get the same module types and the same torch.compile calls. Prediction loads a fold's model through it
too, placed for prediction."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import CONFIGS, DATA, REPO
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
    assert list(steps) == ["dequant_cache", "pooled_last_layer", "attention", "shared_dropout"]  # as the fold had it
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


TRAIN = """
import sys
from pathlib import Path
from trainer_core.config import load_config, validate
from trainer_core.config.merge import to_yaml
from trainer_core.data.arena import assign_folds, load_rows
from trainer_core.fold.loop import train_fold
run = Path(sys.argv[1])
cfg = load_config(sys.argv[2], sys.argv[4:])
validate(cfg)
rows = assign_folds(load_rows(sys.argv[3], max_rows=60), 5)
train_fold(cfg, 0, rows, run / "fold=0")
(run / "config.yaml").write_text(to_yaml(cfg))
rows[rows["fold"] == 0].to_parquet(run.parent / "held.parquet")
"""

PREDICT = """
import json, sys
from pathlib import Path
import numpy as np, pandas as pd, torch
from torch._dynamo.utils import counters
from orchestrator.runs.scoring import fold_predictions
lines = []
(k, probs), = fold_predictions(Path(sys.argv[1]), pd.read_parquet(sys.argv[2]), [0], tta=False,
                               device=torch.device("cpu"), log=lines.append)
np.save(sys.argv[3], probs)
print(json.dumps({"graphs": dict(counters["inductor"]), "lines": lines}))
"""


@pytest.mark.slow  # a fold compiles and trains on the CPU (~70 s on two cores), then another process predicts
def test_prediction_reads_back_the_inference_graphs_its_fold_compiled(tmp_path):
    """A finished run's compile cache serves orchestrator.predict's path (runs.scoring.fold_predictions): a fold,
    trained in a process of its own, compiled its held-out rows' graphs into ``<run>/compile_cache`` (as its Ray
    worker points it); a new process loads the fold model (its fast path as the fold had it, the shared LoRA dropout
    included: an identity in evaluation, but another graph than peft's dropout) and compiles none of them again: the
    frozen and the adapted decoder layer and the pooled top layer. Its probabilities are the fold's own."""
    run = tmp_path / "run"
    plain = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    plain["PYTHONPATH"] = str(REPO)
    fold_env = {**plain, "TORCHINDUCTOR_CACHE_DIR": str(run / "compile_cache"),
                "TRITON_CACHE_DIR": str(run / "compile_cache" / "triton")}
    trained = subprocess.run([sys.executable, "-c", TRAIN, str(run), str(CONFIGS / "smoke.yaml"), str(DATA), *FAST,
                              "train.max_steps=1", "model.gradient_checkpointing=off", "train.eval_batch_size=8"],
                             capture_output=True, text=True, timeout=900, env=fold_env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    out = subprocess.run([sys.executable, "-c", PREDICT, str(run), str(tmp_path / "held.parquet"),
                          str(tmp_path / "probs.npy")], capture_output=True, text=True, timeout=600, env=plain)
    assert out.returncode == 0, out.stderr[-3000:]
    said = json.loads(out.stdout.strip().splitlines()[-1])
    assert said["graphs"].get("fxgraph_cache_hit", 0) >= 3 and said["graphs"].get("fxgraph_cache_miss", 0) == 0, \
        said["graphs"]
    assert said["lines"][0] == f"run: compiled layers read from and kept in {run / 'compile_cache'}"
    held = pd.read_parquet(tmp_path / "held.parquet")
    oof = pd.read_parquet(run / "fold=0" / "oof.parquet").set_index("id").loc[held["id"]]
    np.testing.assert_allclose(np.load(tmp_path / "probs.npy"), oof[["p_a", "p_b", "p_tie"]].to_numpy(), rtol=1e-5,
                               atol=1e-6)
