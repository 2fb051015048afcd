"""Rebuild a run's OOF report from its fold files alone (no Ray, no GPU): report.json, report.md, report.html
(self-contained, figures embedded), report_plots/*.png and oof.parquet.

Examples::

    python -m orchestrator.report runs/demo_cpu
    python -m orchestrator.report runs/g9b --folds 0,1
    python -m orchestrator.report s3://bucket/runs/g9b        # a run directory on object storage: rebuilt there
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestrator.reporting.reducer import ReduceError, format_table, reduce_run
from orchestrator.runs.staging import staged
from orchestrator.runs.storage import StorageError, is_uri, join
from trainer_core.data.arena import parse_folds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory written by orchestrator.cv: a folder or a URI (s3://..., gs://...; "
                                   "the report is rebuilt there)")
    p.add_argument("--folds", default=None, help="folds to include (default: the folds the run was asked for)")
    args = p.parse_args(argv)
    try:
        with staged(args.run_dir, write_back=True) as run_dir:
            return _report(args, run_dir)
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _report(args, run_dir: Path) -> int:
    meta_path = run_dir / "run.json"
    if not meta_path.exists():
        print(f"error: {args.run_dir}: not a run directory (no run.json)", file=sys.stderr)
        return 2
    meta = json.loads(meta_path.read_text())
    try:
        folds = parse_folds(args.folds, int(meta["n_folds"])) if args.folds else meta["folds"]
        report = reduce_run(run_dir, folds, location=args.run_dir if is_uri(args.run_dir) else None)
    except (ReduceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(report))
    shown = join(args.run_dir, "report.html") if is_uri(args.run_dir) else run_dir / "report.html"
    print(f"\nwrote {shown}, report.md, report.json, report_plots/, oof.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
