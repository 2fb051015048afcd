"""Combine finished runs over the same rows into an ensemble, written as a run-like directory. No Ray, no model: it
reads the members' OOF rows (``oof.parquet``) and writes ``report.json``, ``oof.parquet``, ``report.md``,
``report.html`` (the reducer's writers) and ``ensemble.json`` (members and weights, what predict reads).

Examples::

    python -m orchestrator.ensemble runs/minilm runs/gemma --out runs/ens
    python -m orchestrator.ensemble runs/a runs/b runs/c --out runs/ens_logit --method logit
    python -m orchestrator.ensemble s3://bucket/runs/a runs/b --out runs/ens   # members on object storage too
    python -m orchestrator.ensemble runs/minilm --with-length-baseline --out runs/minilm_plus_length
    python -m orchestrator.predict --run runs/ens --data test.csv --out submission.csv

Methods (``--method``, default ``weights``): ``mean`` averages the members' probabilities; ``weights`` fits a
weighted average (weights >= 0 summing to 1); ``logit`` fits ``softmax(sum_m w_m log p_m)`` (w_m >= 0). Fitted weights
are cross-fitted, so the ensemble's OOF log loss is as honest as its members': fold k's rows are combined with weights
fitted on the other folds' OOF rows only. An optimistic member (say, a student of plain OOF soft labels) makes the
ensemble optimistic, and its reports say so. Members must cover the same ids with the same folds and labels, and come
from the same data file, data.fold_by and data.n_folds (refused otherwise). A member given as a URI (s3://, gs://, ...)
is read from there and recorded as that URI in ``ensemble.json``; ``predict`` downloads it again when it needs it.


``--with-length-baseline`` adds the report's length-only logistic regression as one more member (one run is then
enough): cross-fitted like the report's baseline (fold k's rows scored by a regression fitted on the other folds'
rows), weighted by the same cross-fitted weights, and refitted per fold on the ensemble's data for new rows. The
ensemble's figure against the run's own says what the model adds on top of length.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.reporting import baselines
from orchestrator.reporting.honesty import warning
from orchestrator.reporting.reducer import OOF_COLUMNS, PROB_COLUMNS, summarise, write_reports
from orchestrator.runs import ensemble_weights
from orchestrator.runs.align import RunMismatch, check_aligned, load_oof, read_report
from orchestrator.runs.provenance import ENSEMBLE_FILE, ensemble_provenance, is_ensemble, run_provenance
from orchestrator.runs.staging import staged
from orchestrator.runs.storage import StorageError, is_uri
from trainer_core import metrics
from trainer_core.paths import atomic_write, atomic_write_json

__all__ = ["ENSEMBLE_FILE", "build_ensemble", "check_out", "is_ensemble", "main", "write_ensemble"]


def check_out(out: Path, run_dirs: list[Path]) -> None:
    """RunMismatch unless ``out`` is apart from every member: writing it replaces the directory, so it must not be a
    member, lie inside one, or hold one."""
    target = out.resolve()
    for d in run_dirs:
        member = d.resolve()
        if target == member or member in target.parents or target in member.parents:
            where = "is" if target == member else "lies inside" if member in target.parents else "holds"
            raise RunMismatch(f"--out {out} {where} the member {d}; write the ensemble to a directory of its own")


LENGTH_MEMBER = "length baseline"


def build_ensemble(run_dirs: list[Path], method: str, uris: list[str | None] | None = None,
                   with_length_baseline: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, dict, dict]:
    """(ensemble OOF rows, the data rows, report dict, ensemble.json dict), computed without writing anything.
    ``uris``: per member, the URI it was read from when ``run_dirs`` holds its local staging copy (else None).
    ``with_length_baseline``: the cross-fitted length-only baseline joins as the last member."""
    if len(run_dirs) + with_length_baseline < 2:
        raise RunMismatch("an ensemble needs at least two members: two run directories, or one with "
                          "--with-length-baseline")
    names = [u or str(d.resolve()) for d, u in zip(run_dirs, uris or [None] * len(run_dirs))]
    if len(set(names)) < len(run_dirs):
        raise RunMismatch("the same run directory is given twice")
    oofs = [load_oof(d) for d in run_dirs]
    check_aligned([(n, o) for n, o in zip(names, oofs)])
    # Members share data and folds (refused otherwise); an optimistic member makes the ensemble optimistic.
    provenance = ensemble_provenance([run_provenance(d) for d in run_dirs], names)
    labels, fold_of = oofs[0]["label"].to_numpy(), oofs[0]["fold"].to_numpy()
    probs = [o[PROB_COLUMNS].to_numpy() for o in oofs]
    folds = sorted(int(k) for k in np.unique(fold_of))
    rows = pd.read_parquet(run_dirs[0] / "data.parquet")
    described = [(name, read_report(d).get("experiment")) for d, name in zip(run_dirs, names)]
    if with_length_baseline:  # fold k's rows scored by a regression fitted on the other folds' rows
        probs.append(baselines.cross_fitted(oofs[0][["id", "fold"]], rows, folds))
        described.append(("", LENGTH_MEMBER))
    combined, fold_weights = ensemble_weights.cross_fit(labels, probs, fold_of, method)
    weights = [float(x) for x in ensemble_weights.fit_weights(labels, probs, method)]
    oof = oofs[0][["id", "fold", "label"]].copy()
    oof[PROB_COLUMNS] = combined
    report = summarise(oof[OOF_COLUMNS], rows, folds, [{"fold": k} for k in folds])
    members = []
    for (run_dir, experiment), p in zip(described, probs):
        members.append({"run_dir": run_dir, "experiment": experiment,
                        "cv_log_loss": metrics.log_loss(labels, p),
                        "log_loss_by_fold": {str(k): metrics.log_loss(labels[fold_of == k], p[fold_of == k])
                                             for k in folds}})
    for f in report["folds"]:
        f["member_log_losses"] = [m["log_loss_by_fold"][str(f["fold"])] for m in members]
        f["weights"] = fold_weights[f["fold"]]
    titles = ", ".join(m["experiment"] or Path(m["run_dir"]).name for m in members)
    report.update(experiment=f"ensemble ({method}) of {titles}", fingerprint=None, fold_by=provenance["fold_by"],
                  optimistic_because=provenance["optimistic_because"], ensemble={
        "method": method, "members": members, "weights": weights,
        "weights_by_fold": {str(k): w for k, w in fold_weights.items()},
        "note": ("weights applied to fold k's rows were fitted on the other folds' OOF rows only (cross-fitted); "
                 "'weights' (fitted on all OOF rows) is what predict applies to new rows")})
    spec = {"method": method, "members": names, "weights": weights, "folds": folds,
            "weights_by_fold": report["ensemble"]["weights_by_fold"], "provenance": provenance,
            "length_baseline": with_length_baseline}
    return oof, rows, report, spec


def write_ensemble(out: Path, oof: pd.DataFrame, rows: pd.DataFrame, report: dict, spec: dict) -> None:
    """Write the ensemble directory (replacing an earlier ensemble there, never a run). Members are stored relative to
    it, so a copied tree of runs and ensemble still predicts."""
    check_out(out, [Path(m) for m in spec["members"] if not is_uri(m)])
    if out.exists() and any(out.iterdir()) and not is_ensemble(out):
        raise RunMismatch(f"{out}: exists and is not an ensemble directory; choose another --out")
    spec = {**spec, "members": [m if is_uri(m) else os.path.relpath(Path(m).resolve(), out.resolve())
                                for m in spec["members"]]}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    report["run_dir"] = str(out.resolve())
    atomic_write(out / "data.parquet", lambda p: rows.to_parquet(p, index=False))
    atomic_write_json(out / ENSEMBLE_FILE, spec)
    write_reports(out, oof, report)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.ensemble", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="finished runs (or ensembles), two or more: folders or URIs (s3://bucket/prefix, gs://...)")
    p.add_argument("--out", type=Path, required=True, help="the ensemble directory to write")
    p.add_argument("--method", choices=ensemble_weights.METHODS, default="weights",
                   help="mean: average; weights: fitted weighted average (default); logit: fitted weighted log-average")
    p.add_argument("--with-length-baseline", action="store_true",
                   help="add the cross-fitted length-only baseline (the report's) as one more member, with the same "
                        "cross-fitted weights: what the runs add on top of length (one run directory is then enough)")
    args = p.parse_args(argv)
    try:
        # before reading anything: an ensemble that holds itself never ends
        check_out(args.out, [Path(d) for d in args.run_dirs if not is_uri(d)])
        with contextlib.ExitStack() as stack:  # members at URIs: their reports and OOF rows, staged
            dirs = [stack.enter_context(staged(d)) for d in args.run_dirs]
            uris = [d if is_uri(d) else None for d in args.run_dirs]
            oof, rows, report, spec = build_ensemble(dirs, args.method, uris, args.with_length_baseline)
        write_ensemble(args.out, oof, rows, report, spec)
    except (RunMismatch, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = [f"{'member':<40} {'cv_log_loss':>11} {'weight':>8}"]
    lines += [f"{(m['run_dir'] or m['experiment'])[-40:]:<40} {m['cv_log_loss']:>11.4f} {w:>8.3f}"
              for m, w in zip(report["ensemble"]["members"], spec["weights"])]
    lines.append(f"{'ensemble (' + args.method + ', cross-fitted)':<40} {report['cv_log_loss']:>11.4f}")
    print("\n".join(lines))
    if warning(report):
        print("WARNING: " + warning(report))
    print(f"\nwrote {args.out / 'report.html'}, report.md, report.json, oof.parquet, {ENSEMBLE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
