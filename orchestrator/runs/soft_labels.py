"""Soft labels a run (or ensemble) writes for distillation (``orchestrator.predict --soft-labels``): its OOF
probabilities, or with ``--in-fold`` each fold model's predictions on its own training rows (see predict's docstring
and trainer_core.data.soft_labels for how a student uses each kind)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from orchestrator.reporting import calibration
from orchestrator.reporting.reducer import PROB_COLUMNS, TTA_COLUMNS


class SoftLabelExportError(ValueError):
    """The run's files cannot give soft labels; the message says how to fix it."""


def oof_soft_labels(run_dir: Path, report: dict) -> pd.DataFrame:
    """The run's OOF probabilities with their cross-fitted temperature-scaled versions (columns: module docstring)."""
    oof = pd.read_parquet(run_dir / "oof.parquet")
    if len(oof) != report["n_rows"]:
        raise SoftLabelExportError(f"{run_dir}: oof.parquet has {len(oof)} rows but report.json {report['n_rows']}; "
                                   f"rebuild both with `python -m orchestrator.report {run_dir}`")
    out = oof[["id", "fold", "label", *PROB_COLUMNS]].copy()
    variants = [("", PROB_COLUMNS, "temperatures_by_fold", "temperature")]
    if set(TTA_COLUMNS) <= set(oof.columns) and "temperatures_tta_by_fold" in report:
        out[TTA_COLUMNS] = oof[TTA_COLUMNS]
        variants.append(("_tta", TTA_COLUMNS, "temperatures_tta_by_fold", "temperature_tta"))
    for suffix, cols, key, t_col in variants:
        temps = report[key]
        cal = calibration.calibrate_by_fold(oof[cols].to_numpy(), oof["fold"].to_numpy(), temps)
        out[[f"p_a{suffix}_cal", f"p_b{suffix}_cal", f"p_tie{suffix}_cal"]] = cal
        out[t_col] = oof["fold"].astype(str).map(temps).astype(float)
    return out


def in_fold_soft_labels(run_dir: Path, folds: list[int], fold_predictions, *, device,
                        batch_size: int | None = None, log=print) -> pd.DataFrame:
    """(id, fold, label, p_a, p_b, p_tie) for every fold k in ``folds``: fold k's model's plain probabilities on the
    run's rows whose fold != k (its own training rows), so a student's fold k can learn from them without any
    fold-k label having shaped them. ``fold_predictions``: orchestrator.predict's (passed in: no import cycle)."""
    rows = pd.read_parquet(run_dir / "data.parquet")
    parts = []
    for k in folds:
        train = rows[rows["fold"] != k].sort_values("id").reset_index(drop=True)
        (_, probs), = fold_predictions(run_dir, train, [k], tta=False, device=device, batch_size=batch_size, log=log,
                                       cross_fitted=True)
        part = pd.DataFrame({"id": train["id"].to_numpy(), "fold": k, "label": train["label"].to_numpy()})
        part[PROB_COLUMNS] = probs
        parts.append(part)
    return pd.concat(parts, ignore_index=True)
