"""The reducer: fold files -> ``report.json``, ``oof.parquet``, ``report.md``, ``report.html`` (+ ``report_plots/``).

It reads only files (``data.parquet``, ``fold=<k>/{metrics.json,oof.parquet}`` and, for the recipe, ``run.json``,
``config.yaml``, ``sessions.json`` and ``tensorboard/``), so it needs no Ray and can be rerun on a finished run
directory at any time (``python -m orchestrator.report RUN_DIR``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.reporting import baselines, bootstrap, calibration, diagnostics
from orchestrator.reporting.honesty import distillation_note, warning
from orchestrator.reporting.html import render_html
from orchestrator.reporting.markdown import render_markdown
from orchestrator.reporting.plots import render_figures
from orchestrator.reporting.recipe import read_recipe
from trainer_core import metrics
from trainer_core.paths import atomic_write, atomic_write_json, atomic_write_text

PROB_COLUMNS = ["p_a", "p_b", "p_tie"]
OOF_COLUMNS = ["id", "fold", "label", *PROB_COLUMNS]
TTA_COLUMNS = ["p_a_tta", "p_b_tta", "p_tie_tta"]  # optional (train.eval_tta): responses a/b swapped, averaged back
PLOTS_DIR = "report_plots"  # PNGs linked from report.md; report.html embeds the same images


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
    fold_metrics = json.loads((fdir / "metrics.json").read_text())
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
    for cols in (PROB_COLUMNS, TTA_COLUMNS):
        if not set(cols) <= set(oof.columns):
            continue
        p = oof[cols].to_numpy()
        if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-6):
            raise ReduceError(f"{fdir / 'oof.parquet'}: {', '.join(cols)} are not finite rows summing to 1")
    return fold_metrics, oof


def reduce_run(run_dir: str | Path, folds: list[int], location: str | None = None) -> dict:
    """Build and write the combined report for ``folds``; returns the report dict. ``location``: where the run
    directory lives when ``run_dir`` is its local staging copy (a URI), as the report names it."""
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
    # TTA columns are reported only when every fold has them: a CV figure over some folds would not be comparable.
    has_tta = all(set(TTA_COLUMNS) <= set(p.columns) for p in parts)
    oof = pd.concat(parts).sort_values("id").reset_index(drop=True)[OOF_COLUMNS + (TTA_COLUMNS if has_tta else [])]
    report = summarise(oof, rows, folds, fold_metrics)
    report["run_dir"] = location or str(run_dir.resolve())
    run_meta = run_dir / "run.json"
    meta = json.loads(run_meta.read_text()) if run_meta.exists() else {}
    report["experiment"] = meta.get("experiment")
    report["fingerprint"] = meta.get("fingerprint")
    report["fold_by"] = meta.get("fold_by", "id")  # runs from before data.fold_by split by id
    report["optimistic_because"] = []
    if meta.get("soft_labels"):
        report["distillation"] = distillation_note(meta["soft_labels"])
        report["optimistic_because"] = report["distillation"]["optimistic_because"]
    report["recipe"] = read_recipe(run_dir, folds, fold_metrics, meta, location)
    write_reports(run_dir, oof, report)
    return report


def write_reports(run_dir: Path, oof: pd.DataFrame, report: dict) -> None:
    """Write ``oof.parquet``, the figures, ``report.md``, ``report.html`` and ``report.json`` (last: its presence
    means the rest is there). Shared by runs and by ``orchestrator.ensemble``."""
    figures = render_figures(report)
    atomic_write(run_dir / "oof.parquet", lambda p: oof.to_parquet(p, index=False))
    for name, png in figures.items():
        atomic_write(run_dir / PLOTS_DIR / f"{name}.png", lambda p, b=png: p.write_bytes(b))
    atomic_write_text(run_dir / "report.md", render_markdown(report, {n: f"{PLOTS_DIR}/{n}.png" for n in figures}))
    atomic_write_text(run_dir / "report.html", render_html(report, figures))
    atomic_write_json(run_dir / "report.json", report)


def summarise(oof: pd.DataFrame, rows: pd.DataFrame, folds: list[int], fold_metrics: list[dict]) -> dict:
    """Every number of the report, from the combined OOF rows and the run's data (JSON-able)."""
    labels = oof["label"].to_numpy()
    fold_of = oof["fold"].to_numpy()
    probs = oof[PROB_COLUMNS].to_numpy()
    # Baseline: each held-out row gets the class prior of its own fold's training rows.
    prior = np.zeros_like(probs)
    for k in folds:
        prior[fold_of == k] = metrics.class_prior(rows.loc[rows["fold"] != k, "label"].to_numpy())
    # Second baseline: a logistic regression on response lengths, fitted per fold on that fold's training rows.
    length = baselines.cross_fitted(oof, rows, folds)
    calibrated, temps = calibration.cross_fit(labels, probs, fold_of)
    variants = {"": probs, "_calibrated": calibrated}
    report = {
        "cv_log_loss": metrics.log_loss(labels, probs),
        "cv_log_loss_ci95": bootstrap.log_loss_ci95(labels, probs),
        "cv_accuracy": metrics.accuracy(labels, probs),
        "prior_log_loss": metrics.log_loss(labels, prior),
        "length_baseline_log_loss": metrics.log_loss(labels, length),
        "length_baseline_features": baselines.FEATURE_DOC,
        "cv_log_loss_calibrated": metrics.log_loss(labels, calibrated),
        "temperature": calibration.fit_temperature(labels, probs),
        "temperatures_by_fold": {str(k): t for k, t in temps.items()},
    }
    if TTA_COLUMNS[0] in oof.columns:
        tta = oof[TTA_COLUMNS].to_numpy()
        tta_cal, tta_temps = calibration.cross_fit(labels, tta, fold_of)
        variants.update({"_tta": tta, "_tta_calibrated": tta_cal})
        report.update({
            "cv_log_loss_tta": metrics.log_loss(labels, tta),
            "cv_accuracy_tta": metrics.accuracy(labels, tta),
            "cv_log_loss_tta_calibrated": metrics.log_loss(labels, tta_cal),
            "temperature_tta": calibration.fit_temperature(labels, tta),
            "temperatures_tta_by_fold": {str(k): t for k, t in tta_temps.items()},
        })
    by_fold = {m["fold"]: m for m in fold_metrics}
    per_fold = []
    for k in folds:
        sel = fold_of == k
        y, m = labels[sel], by_fold[k]
        entry = {"fold": k, "n_rows": int(sel.sum()), "log_loss": metrics.log_loss(y, probs[sel]),
                 "accuracy": metrics.accuracy(y, probs[sel]), "prior_log_loss": metrics.log_loss(y, prior[sel]),
                 "length_baseline_log_loss": metrics.log_loss(y, length[sel])}
        for suffix, p in variants.items():
            if suffix:
                entry[f"log_loss{suffix}"] = metrics.log_loss(y, p[sel])
        entry.update(temperature=temps[k], steps=m.get("steps"), train_seconds=m.get("train_seconds"),
                     train_samples_per_s=m.get("train_samples_per_s"))
        per_fold.append(entry)
    rel = {name or "plain": diagnostics.reliability(labels, p) for name, p in
           (("", probs), ("calibrated", calibrated))}
    data = oof[["id"]].merge(rows, on="id", how="left", validate="one_to_one")
    report.update({
        "cv_log_loss_fold_std": bootstrap.fold_std([f["log_loss"] for f in per_fold]),
        "n_rows": int(len(oof)),
        "n_folds": len(folds),
        "label_counts": {name: int((labels == i).sum()) for i, name in enumerate(("a", "b", "tie"))},
        "folds": per_fold,
        "confusion": diagnostics.confusion(labels, probs),
        "ece": rel["plain"]["ece"],
        "ece_calibrated": rel["calibrated"]["ece"],
        "reliability": rel,
        "length_unit": "characters of the formatted input text (prompt, response a, response b with their prefixes)",
        "length_buckets": diagnostics.length_buckets(diagnostics.text_lengths(data), labels, probs, prior),
        "clip": metrics.EPS,
    })
    return report


def format_table(report: dict) -> str:
    """The plain-text table printed at the end of a run."""
    def num(x) -> str:
        return f"{x:.4f}" if x is not None else "-"

    lines = [f"{'fold':>6} {'rows':>6} {'log_loss':>9} {'accuracy':>9} {'prior_ll':>9} {'length_ll':>9}"]
    for f in report["folds"]:
        lines.append(f"{f['fold']:>6} {f['n_rows']:>6} {f['log_loss']:>9.4f} {f['accuracy']:>9.4f} "
                     f"{num(f.get('prior_log_loss')):>9} {num(f.get('length_baseline_log_loss')):>9}")
    lines.append(f"{'CV':>6} {report['n_rows']:>6} {report['cv_log_loss']:>9.4f} {report['cv_accuracy']:>9.4f} "
                 f"{report['prior_log_loss']:>9.4f} {num(report.get('length_baseline_log_loss')):>9}")
    lo, hi = report["cv_log_loss_ci95"]
    lines.append(f"OOF log loss {report['cv_log_loss']:.4f} (95% CI {lo:.4f}-{hi:.4f} over rows; fold std "
                 f"{num(report.get('cv_log_loss_fold_std'))})")
    for name, key in (("class-prior", "prior_log_loss"), ("length-only baseline", "length_baseline_log_loss")):
        verdict = "beats" if report["cv_log_loss"] < report[key] else "does NOT beat"
        lines.append(f"  {verdict} the {name} log loss {report[key]:.4f}")
    lines.append(f"temperature-scaled (T={report['temperature']:.3f}, cross-fitted per fold): "
                 f"{report['cv_log_loss_calibrated']:.4f}")
    if report.get("distillation"):
        lines.append(("WARNING: " if report["distillation"]["optimistic"] else "") + report["distillation"]["note"])
    if warning(report):
        lines.append("WARNING: " + warning(report))
    if "cv_log_loss_tta" in report:
        lines.append(f"A/B-swap TTA: {report['cv_log_loss_tta']:.4f}, temperature-scaled "
                     f"{report['cv_log_loss_tta_calibrated']:.4f}")
    return "\n".join(lines)
