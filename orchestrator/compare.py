"""Compare two recipes on the same rows: the paired difference of their OOF log losses with a bootstrap 95% interval
over prompt groups, per-fold wins and a one-line verdict that knows about seed-to-seed noise. Reads only the run
directories' files (no Ray, no model).

Examples::

    python -m orchestrator.compare runs/plain runs/swap_augment
    python -m orchestrator.compare runs/a_s1,runs/a_s2,runs/a_s3 runs/b_s1,runs/b_s2,runs/b_s3   # seeds per side
    python -m orchestrator.compare runs/teacher runs/student --json
    python -m orchestrator.compare s3://bucket/runs/plain runs/swap_augment     # a run directory on object storage

The difference is A - B per row (negative: A has the lower log loss); with several runs on a side, each row's loss is
that side's mean over its runs. Each row is scored by both sides, so the rows' shared difficulty cancels. The interval
resamples whole prompt groups (rows whose prompt text is the same, as data.fold_by=prompt reads it), not single rows:
rows that share a prompt are not independent evidence. It still holds the trained models fixed, so it says nothing
about how much another training seed would move each side. Hence the verdict:

- "within seed noise" when |A - B| is no larger than the seed spread: the range of CV log losses over the runs of a
  side, the larger side's, when a side has repeated runs; otherwise --seed-spread (default 0.010, the spread of one
  recipe's seeds measured in docs/QUALITY.md);
- else "A is better" / "B is better" when the whole interval is below / above 0, else "no clear difference".

Runs over different ids, folds or labels are refused with one line (exit 2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.reporting import bootstrap
from orchestrator.reporting.reducer import PROB_COLUMNS
from orchestrator.runs.align import RunMismatch, check_aligned, load_oof
from orchestrator.runs.staging import staged
from orchestrator.runs.storage import StorageError, is_uri
from trainer_core.data.arena import prompt_key

DEFAULT_SEED_SPREAD = 0.010  # docs/QUALITY.md: one recipe's OOF log loss moved up to 0.010 between training seeds


def prompt_groups(run_dir: Path, ids: np.ndarray) -> tuple[np.ndarray, str]:
    """(group label per id, what the groups are): the normalised prompt of each row from the run's data.parquet, or
    the row itself when the run has no data.parquet to read prompts from."""
    path = Path(run_dir) / "data.parquet"
    if not path.exists():
        return np.asarray(ids), "rows (no data.parquet to read prompts from)"
    rows = pd.read_parquet(path, columns=["id", "prompt"])
    return prompt_key(rows.set_index("id")["prompt"]).reindex(ids).fillna("").to_numpy(), "prompts"


def seed_spread(losses_a: list[float], losses_b: list[float], given: float | None) -> tuple[float, str]:
    """(spread, where it came from): ``given`` (--seed-spread), else the larger side's range of CV log losses over its
    repeated runs, else DEFAULT_SEED_SPREAD."""
    if given is not None:
        return given, "--seed-spread"
    ranges = [max(x) - min(x) for x in (losses_a, losses_b) if len(x) > 1]
    if ranges:
        return float(max(ranges)), "measured: range of CV log loss over the repeated runs of a side"
    return DEFAULT_SEED_SPREAD, "assumed (docs/QUALITY.md); give several runs per side to measure it"


def compare_oof(oofs_a: list[pd.DataFrame], oofs_b: list[pd.DataFrame], groups: np.ndarray | None = None,
                spread: float | None = None) -> dict:
    """Paired comparison of aligned OOF frames (same ids, folds and labels, sorted by id), several runs per side
    allowed; ``groups``: one label per row for the bootstrap (default: every row its own group). JSON-able."""
    labels, folds = oofs_a[0]["label"].to_numpy(), oofs_a[0]["fold"].to_numpy()
    runs_a = [bootstrap.row_losses(labels, o[PROB_COLUMNS].to_numpy()) for o in oofs_a]
    runs_b = [bootstrap.row_losses(labels, o[PROB_COLUMNS].to_numpy()) for o in oofs_b]
    loss_a, loss_b = np.mean(runs_a, axis=0), np.mean(runs_b, axis=0)
    diff = loss_a - loss_b
    groups = np.arange(len(diff)) if groups is None else np.asarray(groups)
    low, high = bootstrap.grouped_mean_ci95(diff, groups)
    per_fold = []
    for k in np.unique(folds):
        sel = folds == k
        a, b = float(loss_a[sel].mean()), float(loss_b[sel].mean())
        per_fold.append({"fold": int(k), "n_rows": int(sel.sum()), "log_loss_a": a, "log_loss_b": b,
                         "difference": a - b, "winner": "A" if a < b else "B" if b < a else "tie"})
    cv_a, cv_b = [float(x.mean()) for x in runs_a], [float(x.mean()) for x in runs_b]
    spread, spread_source = seed_spread(cv_a, cv_b, spread)
    d = float(diff.mean())
    verdict = ("within seed noise" if abs(d) <= spread else "A is better" if high < 0 else "B is better" if low > 0
               else "no clear difference")
    return {"n_rows": int(len(diff)), "n_groups": int(len(np.unique(groups.astype(str)))),
            "log_loss_a": float(loss_a.mean()), "log_loss_b": float(loss_b.mean()),
            "log_losses_a": cv_a, "log_losses_b": cv_b, "difference": d, "difference_ci95": [low, high],
            "seed_spread": spread, "seed_spread_source": spread_source, "folds": per_fold,
            "fold_wins": {w: sum(f["winner"] == w for f in per_fold) for w in ("A", "B", "tie")}, "verdict": verdict}


def format_comparison(res: dict) -> str:
    """The human-readable comparison (what the CLI prints without --json)."""
    low, high = res["difference_ci95"]
    def side(name: str, key: str) -> str:
        runs = res[f"log_losses_{key}"]
        each = f" (mean of {len(runs)} runs: {', '.join(f'{x:.4f}' for x in runs)})" if len(runs) > 1 else ""
        return f"{name}: {res[f'run_{key}']}  OOF log loss {res[f'log_loss_{key}']:.4f}{each}"

    lines = [side("A", "a"), side("B", "b"),
             f"A - B: {res['difference']:+.4f}  (95% CI {low:+.4f} to {high:+.4f}, paired bootstrap over "
             f"{res['n_groups']} {res.get('grouped_by', 'prompts')} of {res['n_rows']} rows, models held fixed)",
             f"seed spread: {res['seed_spread']:.4f} ({res['seed_spread_source']})",
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
    p.add_argument("run_a", help="a finished run (or ensemble) directory, a folder or a URI (s3://..., gs://...); "
                                 "several, comma-separated, for repeated seeds of one recipe (e.g. runs/a1,runs/a2)")
    p.add_argument("run_b", help="the same for B, over the same ids and folds")
    p.add_argument("--seed-spread", type=float, default=None, metavar="X",
                   help="differences up to X are 'within seed noise' (default: measured from repeated runs of a side, "
                        f"else {DEFAULT_SEED_SPREAD}, the seed spread in docs/QUALITY.md)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON instead of a table")
    args = p.parse_args(argv)
    if args.seed_spread is not None and args.seed_spread < 0:
        p.error("--seed-spread must be >= 0")
    names_a, names_b = ([x if is_uri(x) else str(Path(x)) for x in side.split(",") if x]
                        for side in (args.run_a, args.run_b))
    try:
        with contextlib.ExitStack() as stack:  # a run at a URI: its OOF rows and data, staged
            dirs = [stack.enter_context(staged(d)) for d in names_a + names_b]
            oofs = [load_oof(d) for d in dirs]
            check_aligned([(n, o) for n, o in zip(names_a + names_b, oofs)])
            groups, grouped_by = prompt_groups(dirs[0], oofs[0]["id"].to_numpy())
    except (RunMismatch, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = {"run_a": args.run_a, "run_b": args.run_b, "runs_a": names_a, "runs_b": names_b, "grouped_by": grouped_by,
           **compare_oof(oofs[:len(names_a)], oofs[len(names_a):], groups, args.seed_spread)}
    print(json.dumps(res, indent=2) if args.json else format_comparison(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
