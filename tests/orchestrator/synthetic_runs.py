"""Run directories built from synthetic OOF probabilities (no model, no Ray), for the tests of the workbench commands
(compare, ensemble) and of the reducer: data.parquet from the bundled rows, fold files, then the real reducer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.reporting.reducer import reduce_run
from tests.conftest import DATA
from trainer_core.data.arena import assign_folds, load_rows

P = ["p_a", "p_b", "p_tie"]


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def bundled_rows(n_rows: int, n_folds: int = 5) -> pd.DataFrame:
    return assign_folds(load_rows(DATA, max_rows=n_rows), n_folds)


def noisy_probs(labels: np.ndarray, signal: float, seed: int, sharpness: float = 1.0) -> np.ndarray:
    """Probabilities that lean towards the true label by ``signal`` (0: pure noise) with Gaussian logit noise."""
    z = signal * np.eye(3)[labels] + np.random.default_rng(seed).normal(0, 1.0, size=(len(labels), 3))
    return softmax(sharpness * z)


def make_run(out: Path, rows: pd.DataFrame, probs: np.ndarray, name: str = "synthetic", **meta) -> Path:
    """Write a finished run directory whose fold k OOF rows are ``probs`` (aligned with ``rows``), then reduce it;
    ``meta``: more run.json keys (fold_by, soft_labels, ...)."""
    out.mkdir(parents=True)
    rows.to_parquet(out / "data.parquet", index=False)
    folds = sorted(int(k) for k in rows["fold"].unique())
    (out / "run.json").write_text(json.dumps({"experiment": name, "n_folds": int(rows["fold"].max()) + 1,
                                              "folds": folds, "fingerprint": "0" * 16, **meta}))
    for k in folds:
        sel = (rows["fold"] == k).to_numpy()
        fdir = out / f"fold={k}"
        fdir.mkdir()
        oof = pd.DataFrame({"id": rows["id"].to_numpy()[sel], "fold": k, "label": rows["label"].to_numpy()[sel]})
        oof[P] = probs[sel]
        oof.to_parquet(fdir / "oof.parquet", index=False)
        (fdir / "metrics.json").write_text(json.dumps({"fold": k, "steps": 1, "train_seconds": 1.0}))
    reduce_run(out, folds)
    return out
