"""A finished five-fold run of the smoke model, for the tests of the commands that use one (predict, export).

Built by the same code the Ray path runs (``prepare_run_dir``, then ``trainer_core.train_fold`` per fold, then the
reducer) but in the test's process: predict and export never touch Ray, and skipping five Ray Train start-ups keeps a
module under a minute on 2 cores. Rows ``N_ROWS`` and after of the bundled data are never trained on or scored."""

from __future__ import annotations

from pathlib import Path

from orchestrator.reporting.reducer import reduce_run
from orchestrator.runs.rundir import prepare_run_dir
from tests.conftest import CONFIGS
from trainer_core.config import load_config, validate
from trainer_core.fold.loop import train_fold

N_ROWS = 60
FOLDS = [0, 1, 2, 3, 4]


def smoke_config(*overrides: str):
    """configs/smoke.yaml on the first N_ROWS rows, 64 tokens a row, TTA at evaluation; then ``overrides``."""
    return load_config(CONFIGS / "smoke.yaml", [f"data.max_rows={N_ROWS}", "data.max_length=64", "train.eval_tta=true",
                                                *overrides])


def build_smoke_run(out: Path) -> Path:
    """The run, trained and reduced, in ``out`` (which must not exist yet)."""
    cfg = smoke_config()
    validate(cfg)
    rows = prepare_run_dir(cfg, out, FOLDS, False, "python -m orchestrator.cv --config configs/smoke.yaml")
    for k in FOLDS:
        train_fold(cfg, k, rows, out / f"fold={k}")
    reduce_run(out, FOLDS)
    return out
