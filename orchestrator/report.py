"""Rebuild a run's OOF report from its fold files alone (no Ray, no GPU): report.json, report.md, report.html
(self-contained, figures embedded), report_plots/*.png and oof.parquet.

Examples::

    python -m orchestrator.report runs/demo_cpu
    python -m orchestrator.report runs/g9b --folds 0,1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestrator.reporting.reducer import ReduceError, format_table, reduce_run
from trainer_core.data.arena import parse_folds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a run directory written by orchestrator.cv")
    p.add_argument("--folds", default=None, help="folds to include (default: the folds the run was asked for)")
    args = p.parse_args(argv)
    meta_path = args.run_dir / "run.json"
    if not meta_path.exists():
        print(f"error: {args.run_dir}: not a run directory (no run.json)", file=sys.stderr)
        return 2
    meta = json.loads(meta_path.read_text())
    try:
        folds = parse_folds(args.folds, int(meta["n_folds"])) if args.folds else meta["folds"]
        report = reduce_run(args.run_dir, folds)
    except (ReduceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(report))
    print(f"\nwrote {args.run_dir / 'report.html'}, report.md, report.json, report_plots/, oof.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
