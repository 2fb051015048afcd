"""Train folds with ``trainer_core.fold.loop.train_fold`` directly - the function every Ray fold calls - and append
one JSON
line per fold (log loss, class prior, rows, extra/swapped row counts, seconds) to a file. A measurement, not a test:
how docs/QUALITY.md compares recipes and levers on the bundled data without Ray, several configs side by side.

Example (the plain demo vs one lever, all five folds)::

    python scripts/fold_grid.py --out grid.jsonl --name plain --folds 0-4
    python scripts/fold_grid.py --out grid.jsonl --name swap --folds 0-4 train.swap_augment=true
    python scripts/fold_grid.py --out grid.jsonl --summary

``--even-ids`` keeps only rows with an even id (the data.extra_train_path measurement gives the odd-id rows to
``data.extra_train_path``). The pooled OOF log loss of a name is the row-weighted mean of its folds' log losses.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd


def run(args: argparse.Namespace) -> None:
    import torch

    from trainer_core.config import load_config, validate
    from trainer_core.data.arena import assign_folds, load_rows, parse_folds
    from trainer_core.fold.loop import train_fold

    cfg = load_config(args.config, args.overrides)
    validate(cfg)
    rows = load_rows(cfg.data.path, max_rows=cfg.data.max_rows)
    if args.even_ids:
        rows = rows[rows["id"] % 2 == 0].reset_index(drop=True)
    rows = assign_folds(rows, cfg.data.n_folds, cfg.data.fold_by)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    for fold in parse_folds(args.folds, cfg.data.n_folds):
        t0 = time.perf_counter()
        m = train_fold(cfg, fold, rows, tempfile.mkdtemp(prefix=f"grid-{args.name}-"), device=device).metrics
        rec = {"name": args.name, "overrides": args.overrides, "fold": fold, "log_loss": m.log_loss,
               "prior_log_loss": m.prior_log_loss, "n_rows": m.n_rows, "n_extra_train_rows": m.n_extra_train_rows,
               "extra_dropped_shared_prompt": m.extra_dropped_shared_prompt,
               "n_swapped_train_rows": m.n_swapped_train_rows, "seconds": time.perf_counter() - t0,
               "device": str(device)}
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)


def summary(path: Path) -> None:
    df = pd.read_json(path, lines=True)
    df["ll_rows"], df["prior_rows"] = df["log_loss"] * df["n_rows"], df["prior_log_loss"] * df["n_rows"]
    g = df.groupby("name").agg(folds=("fold", "count"), rows=("n_rows", "sum"), ll=("ll_rows", "sum"),
                               prior=("prior_rows", "sum"), seconds=("seconds", "sum"))
    g["oof_log_loss"], g["prior_log_loss"] = g["ll"] / g["rows"], g["prior"] / g["rows"]
    print(g[["folds", "rows", "oof_log_loss", "prior_log_loss", "seconds"]].round(4).to_string())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON-lines file the folds are appended to")
    p.add_argument("--name", default="run", help="label of this configuration in the file")
    p.add_argument("--config", default="configs/demo_cpu.yaml")
    p.add_argument("--folds", default="0-4")
    p.add_argument("--even-ids", action="store_true", help="only rows with an even id")
    p.add_argument("--summary", action="store_true", help="print the pooled figures of every name and exit")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args()
    summary(args.out) if args.summary else run(args)


if __name__ == "__main__":
    main()
