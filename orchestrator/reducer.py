"""The reducer: fold files -> ``report.json``, ``oof.parquet``, ``report.md`` (and ``report.html``).

It reads only files (``data.parquet`` and ``fold=<k>/{metrics.json,oof.parquet}``), so it needs no Ray and can be rerun
on a finished run directory at any time (``python -m orchestrator.report RUN_DIR``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from trainer_core import metrics as M
from trainer_core.paths import atomic_write, atomic_write_json, atomic_write_text

OOF_COLUMNS = ["id", "fold", "label", "p_a", "p_b", "p_tie"]


class ReduceError(ValueError):
    """The run directory does not hold complete, consistent results for the requested folds."""


def _ids(ids, limit: int = 5) -> str:
    ids = list(ids)
    return ", ".join(map(str, ids[:limit])) + (f" (+{len(ids) - limit} more)" if len(ids) > limit else "")


def fold_is_complete(run_dir: Path, fold: int, rows: pd.DataFrame | None = None) -> bool:
    """True when the fold's files exist and its OOF file covers exactly its rows (checked, not trusted)."""
    try:
        load_fold(run_dir, fold, rows if rows is not None else pd.read_parquet(run_dir / "data.parquet"))
        return True
    except (ReduceError, OSError, ValueError):
        return False


def load_fold(run_dir: Path, fold: int, rows: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """(metrics, oof) of a finished fold, validated against the run's rows; raises ReduceError saying what is wrong."""
    fdir = run_dir / f"fold={fold}"
    if not (fdir / "metrics.json").exists():
        raise ReduceError(f"{fdir}: fold {fold} has not finished (no metrics.json)")
    if not (fdir / "oof.parquet").exists():
        raise ReduceError(f"{fdir}: oof.parquet is missing")
    metrics = json.loads((fdir / "metrics.json").read_text())
    oof = pd.read_parquet(fdir / "oof.parquet")
    missing_cols = [c for c in OOF_COLUMNS if c not in oof.columns]
    if missing_cols:
        raise ReduceError(f"{fdir / 'oof.parquet'}: missing columns {', '.join(missing_cols)}")
    expected = set(rows.loc[rows["fold"] == fold, "id"])
    got = oof["id"]
    dup = got[got.duplicated()].unique()
    if len(dup):
        raise ReduceError(f"{fdir / 'oof.parquet'}: duplicate ids {_ids(dup)}")
    missing = sorted(expected - set(got))
    extra = sorted(set(got) - expected)
    if missing:
        raise ReduceError(f"{fdir / 'oof.parquet'}: fold {fold} lacks ids {_ids(missing)}")
    if extra:
        raise ReduceError(f"{fdir / 'oof.parquet'}: ids not in fold {fold}: {_ids(extra)}")
    p = oof[["p_a", "p_b", "p_tie"]].to_numpy()
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-6):
        raise ReduceError(f"{fdir / 'oof.parquet'}: probabilities are not finite rows summing to 1")
    return metrics, oof


def reduce_run(run_dir: str | Path, folds: list[int]) -> dict:
    """Build and write the combined report for ``folds``; returns the report dict."""
    run_dir = Path(run_dir)
    if not (run_dir / "data.parquet").exists():
        raise ReduceError(f"{run_dir}: not a run directory (no data.parquet)")
    rows = pd.read_parquet(run_dir / "data.parquet")
    problems, parts, fold_metrics = [], [], []
    for k in folds:
        try:
            m, oof = load_fold(run_dir, k, rows)
        except ReduceError as e:
            problems.append(str(e))
            continue
        parts.append(oof)
        fold_metrics.append(m)
    if problems:
        raise ReduceError("incomplete run, no report written:\n  " + "\n  ".join(problems))
    oof = pd.concat(parts).sort_values("id").reset_index(drop=True)[OOF_COLUMNS]
    labels = oof["label"].to_numpy()
    probs = oof[["p_a", "p_b", "p_tie"]].to_numpy()
    # Baseline: each held-out row gets the class prior of its own fold's training rows.
    prior = np.zeros_like(probs)
    for k in folds:
        mask = (oof["fold"] == k).to_numpy()
        prior[mask] = M.class_prior(rows.loc[rows["fold"] != k, "label"].to_numpy())
    per_fold = []
    for m in fold_metrics:
        sel = oof[oof["fold"] == m["fold"]]
        p = sel[["p_a", "p_b", "p_tie"]].to_numpy()
        per_fold.append({
            "fold": m["fold"], "log_loss": M.log_loss(sel["label"], p), "accuracy": M.accuracy(sel["label"], p),
            "n_rows": int(len(sel)), "prior_log_loss": m.get("prior_log_loss"), "steps": m.get("steps"),
            "train_seconds": m.get("train_seconds"), "train_samples_per_s": m.get("train_samples_per_s"),
        })
    report = {
        "cv_log_loss": M.log_loss(labels, probs),
        "cv_accuracy": M.accuracy(labels, probs),
        "prior_log_loss": M.log_loss(labels, prior),
        "n_rows": int(len(oof)),
        "n_folds": len(folds),
        "label_counts": {name: int((labels == i).sum()) for i, name in enumerate(("a", "b", "tie"))},
        "folds": per_fold,
        "clip": M.EPS,
        "run_dir": str(run_dir.resolve()),
    }
    run_meta = run_dir / "run.json"
    if run_meta.exists():
        meta = json.loads(run_meta.read_text())
        report["experiment"] = meta.get("experiment")
        report["fingerprint"] = meta.get("fingerprint")
    atomic_write(run_dir / "oof.parquet", lambda p: oof.to_parquet(p, index=False))
    atomic_write_text(run_dir / "report.md", render_markdown(report))
    atomic_write_json(run_dir / "report.json", report)
    return report


def format_table(report: dict) -> str:
    """The plain-text table printed at the end of a run."""
    lines = [f"{'fold':>6} {'rows':>6} {'log_loss':>9} {'accuracy':>9} {'prior_ll':>9}"]
    for f in report["folds"]:
        prior = f"{f['prior_log_loss']:.4f}" if f.get("prior_log_loss") is not None else "-"
        lines.append(f"{f['fold']:>6} {f['n_rows']:>6} {f['log_loss']:>9.4f} {f['accuracy']:>9.4f} {prior:>9}")
    lines.append(f"{'CV':>6} {report['n_rows']:>6} {report['cv_log_loss']:>9.4f} {report['cv_accuracy']:>9.4f} "
                 f"{report['prior_log_loss']:>9.4f}")
    verdict = "beats" if report["cv_log_loss"] < report["prior_log_loss"] else "does NOT beat"
    lines.append(f"OOF log loss {report['cv_log_loss']:.4f} {verdict} the class-prior log loss "
                 f"{report['prior_log_loss']:.4f}")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    out = [f"# CV report: {report.get('experiment') or Path(report['run_dir']).name}", "",
           f"- OOF log loss: **{report['cv_log_loss']:.4f}** (class prior: {report['prior_log_loss']:.4f})",
           f"- OOF accuracy: {report['cv_accuracy']:.4f}",
           f"- rows: {report['n_rows']} over {report['n_folds']} folds; labels a/b/tie: "
           f"{report['label_counts']['a']}/{report['label_counts']['b']}/{report['label_counts']['tie']}",
           f"- probabilities clipped to [{report['clip']:g}, 1 - {report['clip']:g}] and renormalised (as Kaggle)",
           "", "| fold | rows | log loss | accuracy | class-prior log loss | steps | train s |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    for f in report["folds"]:
        prior = f"{f['prior_log_loss']:.4f}" if f.get("prior_log_loss") is not None else "-"
        secs = f"{f['train_seconds']:.0f}" if f.get("train_seconds") is not None else "-"
        out.append(f"| {f['fold']} | {f['n_rows']} | {f['log_loss']:.4f} | {f['accuracy']:.4f} | {prior} | "
                   f"{f.get('steps', '-')} | {secs} |")
    out.append(f"| **CV** | {report['n_rows']} | **{report['cv_log_loss']:.4f}** | {report['cv_accuracy']:.4f} | "
               f"{report['prior_log_loss']:.4f} | | |")
    return "\n".join(out) + "\n"
