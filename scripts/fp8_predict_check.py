"""What ``model.fp8_predict`` does to a finished run's predictions, measured on its own held-out rows.

For each fold: the fold's held-out rows (the run's ``data.parquet``) are predicted twice on ``orchestrator.predict``'s
path, exact (as the run is configured, plus the overrides given) and with ``model.fp8_predict=true`` (and
``model.dequant_cache=auto`` for an nf4 run that had it off: fp8 keeps nf4 weights through that cache). Both are scored
against their labels beside the fold's own OOF probabilities (``oof.parquet``, computed when the fold trained). Prints
one line per fold and the pooled figures: log loss of each, and the largest and mean absolute change of a
probability. A measurement, not a test: run it on your own run before predicting a test set in fp8 (docs/QUALITY.md
has the figures measured so far).

Example::

    python scripts/fp8_predict_check.py --run runs/g9b --folds 0
    python scripts/fp8_predict_check.py --run runs/demo --folds 0-4 --device cpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd


def check(run: Path, folds: list[int], device: str, overrides: dict) -> dict:
    import torch

    from orchestrator.runs.overrides import run_config
    from orchestrator.runs.scoring import fold_predictions
    from trainer_core import metrics

    cfg = run_config(run, overrides)
    fp8_keys = {"model.fp8_predict": True}
    if cfg.model.quantization == "nf4" and cfg.model.dequant_cache == "off":  # fp8 keeps nf4 weights through the cache
        fp8_keys["model.dequant_cache"] = "auto"
    data, oof = pd.read_parquet(run / "data.parquet"), pd.read_parquet(run / "oof.parquet")
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    labels, probs = [], {"oof": [], "exact": [], "fp8": []}
    for k in folds:
        rows = data[data["fold"] == k].reset_index(drop=True)
        own = oof.set_index("id").loc[rows["id"], ["p_a", "p_b", "p_tie"]].to_numpy()
        got = {}
        for name, extra in (("exact", {}), ("fp8", fp8_keys)):
            (_, p), = fold_predictions(run, rows, [k], tta=False, device=dev, overrides={**overrides, **extra},
                                       log=lambda *_: None)
            got[name] = p
        y = rows["label"].to_numpy()
        delta = np.abs(got["fp8"] - got["exact"])
        print(f"fold {k}: {len(rows)} rows; log loss oof {metrics.log_loss(y, own):.4f}, exact "
              f"{metrics.log_loss(y, got['exact']):.4f}, fp8 {metrics.log_loss(y, got['fp8']):.4f}; "
              f"|fp8 - exact| max {delta.max():.4f}, mean {delta.mean():.5f}", flush=True)
        labels.append(y)
        for name, p in (("oof", own), *got.items()):
            probs[name].append(p)
    y = np.concatenate(labels)
    pooled = {name: np.concatenate(p) for name, p in probs.items()}
    delta = np.abs(pooled["fp8"] - pooled["exact"])
    return {"rows": int(len(y)), **{f"log_loss_{n}": metrics.log_loss(y, p) for n, p in pooled.items()},
            "max_abs_change": float(delta.max()), "mean_abs_change": float(delta.mean())}


def main(argv: list[str] | None = None) -> int:
    from orchestrator.runs.overrides import parse_predict_overrides, run_config
    from trainer_core.data.arena import parse_folds

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a finished run directory (data.parquet, oof.parquet)")
    p.add_argument("--folds", default="0", help="folds to check (default 0)")
    p.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda, cuda:1")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="predict's overrides, e.g. train.precision=bf16")
    args = p.parse_args(argv)
    folds = parse_folds(args.folds, run_config(args.run).data.n_folds)
    result = check(args.run, folds, args.device, parse_predict_overrides(args.overrides))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
