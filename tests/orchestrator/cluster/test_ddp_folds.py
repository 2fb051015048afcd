"""Multi-worker folds: a fold trained by two Ray Train CPU workers (DDP over gloo) end to end through orchestrator.cv,
its OOF checked row for row; the step count a sweep plans for equals what the DDP fold ran."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from orchestrator.tune import auto_eval_every
from tests.conftest import CONFIGS, DATA, REPO
from trainer_core.config import load_config
from trainer_core.data.arena import assign_folds, load_rows
from trainer_core.fastpath.placement import Placement
from trainer_core.fold.data import plan_batches, rank_micro_batch

DDP = ["cluster.cpu_workers_per_fold=2", "data.max_rows=40", "data.max_length=48", "train.checkpoint_every=2",
       "train.eval_every=2", "train.log_every=1"]


@pytest.mark.slow  # orchestrator.cv on a local Ray cluster, one fold over two DDP workers
def test_two_worker_fold_gives_every_held_out_row_once_as_its_model_predicts_it(tmp_path):
    from trainer_core.data.tokenization import encode_rows
    from trainer_core.fold.inference import load_fold_model, predict_probs
    from trainer_core.metrics import clip_probs

    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "orchestrator.cv", "--config", str(CONFIGS / "smoke.yaml"), "--folds",
                          "0", "--out", str(out), *DDP], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "2 CPU worker(s)" in res.stdout
    cfg = load_config(out / "config.yaml")
    rows = pd.read_parquet(out / "data.parquet")
    held = rows[rows["fold"] == 0].sort_values("id").reset_index(drop=True)

    oof = pd.read_parquet(out / "oof.parquet").sort_values("id").reset_index(drop=True)
    assert oof["id"].tolist() == held["id"].tolist()  # every held-out row, once
    assert (oof["label"] == held["label"]).all() and (oof["fold"] == 0).all()
    probs = oof[["p_a", "p_b", "p_tie"]].to_numpy()
    assert np.isfinite(probs).all() and np.allclose(probs.sum(1), 1) and (probs > 0).all()

    metrics = json.loads((out / "fold=0" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["steps"] == auto_eval_every(cfg, rows, [0])[0]  # what a sweep's ASHA rungs are planned from
    # row for row: the saved fold model, run in this one process, gives each row the probabilities the two ranks
    # gathered for it
    model, tok, precision = load_fold_model(cfg, out / "fold=0" / "adapter", torch.device("cpu"))
    ids = encode_rows(held, tok, cfg.data, cfg.model.add_eos_token)
    alone = clip_probs(predict_probs(model, ids, 16, tok.pad_token_id, torch.device("cpu"), torch.no_grad))
    np.testing.assert_allclose(probs, alone, atol=2e-5)

    # the interim evaluation ran on both ranks (it is a collective), and the checkpoint keeps each rank's own RNG
    events = b"".join(p.read_bytes() for p in (out / "tensorboard" / "fold=0").iterdir())
    assert b"interim_log_loss" in events
    (rng_file,) = (out / "ray" / "fold=0").glob("checkpoint_*/rng.json")
    ranks = json.loads(rng_file.read_text())["ranks"]
    assert len(ranks) == 2 and ranks[0]["torch"] != ranks[1]["torch"]  # distinct dropout streams


def test_sweep_steps_split_the_batch_over_ranks_as_the_fold_does():
    rows = assign_folds(load_rows(DATA, max_rows=40), 5)
    for workers in (1, 2, 3):  # 3 does not divide batch_size 8: every rank then takes the whole batch
        cfg = load_config(CONFIGS / "smoke.yaml", [f"cluster.cpu_workers_per_fold={workers}"])
        lengths = np.ones(int((rows["fold"] != 0).sum()), dtype=int)
        placement = Placement(device=torch.device("cpu"), precision="fp32", seq_len=1, recompute="off",
                              micro_batch=rank_micro_batch(cfg, 0, workers), grad_accum=cfg.train.grad_accum)
        fold_plan = plan_batches(cfg, 0, lengths, placement, workers)
        assert auto_eval_every(cfg, rows, [0])[0] == fold_plan.total_steps
