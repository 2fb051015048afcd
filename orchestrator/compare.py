"""Compare two runs on the same rows: the paired difference of their OOF log losses with a bootstrap 95% interval,
per-fold wins and a one-line verdict. Reads only the run directories' files (no Ray, no model).

Examples::

    python -m orchestrator.compare runs/plain runs/swap_augment
    python -m orchestrator.compare runs/teacher runs/student --json

The difference is A − B per row (negative: A has the lower log loss), resampled over rows with a fixed seed. Each row
is scored by both runs, so the rows' shared difficulty cancels: far tighter than setting two intervals side by side.
Verdict: "A is better" when the whole interval is below 0, "B is better" when it is above, else "no clear difference".
Runs over different ids, folds or labels are refused with one line (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.reporting import bootstrap
from orchestrator.reporting.reducer import PROB_COLUMNS
from orchestrator.runs.align import RunMismatch, check_aligned, load_oof
from trainer_core import metrics


def compare_oof(oof_a: pd.DataFrame, oof_b: pd.DataFrame) -> dict:
    """Paired comparison of two aligned OOF frames (same ids, folds and labels, sorted by id); JSON-able."""
    labels, folds = oof_a["label"].to_numpy(), oof_a["fold"].to_numpy()
    loss_a = bootstrap.row_losses(labels, oof_a[PROB_COLUMNS].to_numpy())
    loss_b = bootstrap.row_losses(labels, oof_b[PROB_COLUMNS].to_numpy())
    diff = loss_a - loss_b
    low, high = bootstrap.mean_ci95(diff)
    per_fold = []
    for k in np.unique(folds):
        sel = folds == k
        a, b = float(loss_a[sel].mean()), float(loss_b[sel].mean())
        per_fold.append({"fold": int(k), "n_rows": int(sel.sum()), "log_loss_a": a, "log_loss_b": b,
                         "difference": a - b, "winner": "A" if a < b else "B" if b < a else "tie"})
    verdict = "A is better" if high < 0 else "B is better" if low > 0 else "no clear difference"
    return {"n_rows": int(len(diff)), "log_loss_a": metrics.log_loss(labels, oof_a[PROB_COLUMNS].to_numpy()),
            "log_loss_b": metrics.log_loss(labels, oof_b[PROB_COLUMNS].to_numpy()), "difference": float(diff.mean()),
            "difference_ci95": [low, high], "folds": per_fold,
            "fold_wins": {w: sum(f["winner"] == w for f in per_fold) for w in ("A", "B", "tie")}, "verdict": verdict}


def format_comparison(res: dict) -> str:
    """The human-readable comparison (what the CLI prints without --json)."""
    low, high = res["difference_ci95"]
    lines = [f"A: {res['run_a']}  OOF log loss {res['log_loss_a']:.4f}",
             f"B: {res['run_b']}  OOF log loss {res['log_loss_b']:.4f}",
             f"A - B: {res['difference']:+.4f}  (95% CI {low:+.4f} to {high:+.4f}, paired bootstrap over "
             f"{res['n_rows']} rows)",
             f"{'fold':>6} {'rows':>6} {'A':>8} {'B':>8} {'A - B':>8}  winner"]
    lines += [f"{f['fold']:>6} {f['n_rows']:>6} {f['log_loss_a']:>8.4f} {f['log_loss_b']:>8.4f} "
              f"{f['difference']:>+8.4f}  {f['winner']}" for f in res["folds"]]
    w = res["fold_wins"]
    lines.append(f"folds won: A {w['A']}, B {w['B']}, tied {w['tie']}")
    lines.append(f"verdict: {res['verdict']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a", type=Path, help="a finished run (or ensemble) directory")
    p.add_argument("run_b", type=Path, help="another one over the same ids and folds")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON instead of a table")
    args = p.parse_args(argv)
    try:
        oof_a, oof_b = load_oof(args.run_a), load_oof(args.run_b)
        check_aligned([(str(args.run_a), oof_a), (str(args.run_b), oof_b)])
    except RunMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = {"run_a": str(args.run_a), "run_b": str(args.run_b), **compare_oof(oof_a, oof_b)}
    print(json.dumps(res, indent=2) if args.json else format_comparison(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
