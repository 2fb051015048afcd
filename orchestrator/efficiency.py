"""Measure multi-GPU parallel efficiency of a CV run: (sum of one-GPU fold times) / (GPUs x wall time).

Runs ``orchestrator.cv`` on the given config and folds, then reads each fold's ``metrics.json``: ``fold_seconds``
(model load + training + prediction inside the worker) of the folds that ran on one GPU is the numerator; a fold that
ran data-parallel over several GPUs counts as the mean one-GPU fold time; a fold trained in pieces
(``cluster.rotate_folds``) counts its training plus one model load and prediction. Wall time is the whole command,
Ray start and worker start-up included, so the figure is conservative. Random weights are built before the clock starts.
Also prints each fold's torch.compile recompilations (``recompilations`` in its ``metrics.json``: a fold whose layers
keep compiling new versions spends its first steps compiling, and past dynamo's limit runs them eagerly) and where each
run of a fold spent its wall time (start, compile, train, prediction and files, and when it became steady:
:mod:`orchestrator.perf.fold_timeline`), the figures a choice between packing and rotation rests on.

Example::

    python -m orchestrator.efficiency --config configs/gemma2_9b_fast.yaml --folds 0-4 --out /tmp/eff \\
        model.init=random model.tokenizer=bytes data.max_rows=600
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from orchestrator.perf.fold_timeline import breakdown, format_breakdown, mean_overheads, read_run_logs
from orchestrator.runs.staging import staged
from trainer_core.config import ConfigError, load_config


def one_gpu_seconds(m: dict) -> float:
    """What the fold would take alone in one run: all its training plus one model load and one prediction (those of
    its last run). A fold trained in pieces (cluster.rotate_folds) loaded the model once per piece: only once counts."""
    if m.get("last_run_seconds") is None:
        return m["fold_seconds"]
    return m["train_seconds"] + m["last_run_seconds"] - m["last_run_train_seconds"]


def recompilations_text(m: dict) -> str:
    """The fold's torch.compile recompilations (its last run's; ``trainer_core.fastpath.recompiles``)."""
    n = m.get("recompilations")
    return "recompilations not counted" if n is None else f"{n} recompilation{'s' * (n != 1)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.efficiency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="config to run")
    p.add_argument("--folds", default="0-4", help="folds (default 0-4)")
    p.add_argument("--out", required=True,
                   help="run directory: new, empty, or an earlier run's (wiped first: cv --restart, which refuses any "
                        "other folder); a folder or a URI (s3://bucket/prefix, gs://..., as cv --out)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = p.parse_intermixed_args(argv)
    try:  # a bad config or override is one line, before any weights are built (cv itself checks everything else)
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.model.init == "random":
        from trainer_core.data.tokenization import build_tokenizer
        from trainer_core.model.build import random_weights_dir
        from trainer_core.model.precision import random_weights_dtype

        pad = build_tokenizer(cfg.model).pad_token_id
        device = torch.device("cuda" if cfg.cluster.gpus_per_fold > 0 else "cpu")  # where the folds will train
        random_weights_dir(cfg.model, pad, cfg.train.seed, random_weights_dtype(cfg.train.precision, device))
    n_gpus = torch.cuda.device_count()
    t0, t0_wall = time.perf_counter(), time.time()
    res = subprocess.run([sys.executable, "-m", "orchestrator.cv", "--config", str(args.config), "--folds",
                          args.folds, "--out", args.out, "--restart", *args.overrides])
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        return res.returncode
    with staged(args.out, write_back=True) as out:  # a run at a URI: its files, and efficiency.json back there
        return _measure(out, wall, t0_wall, n_gpus)


def _measure(out: Path, wall: float, t0_wall: float, n_gpus: int) -> int:
    """Print and write (efficiency.json) the figures of the finished run in ``out``."""
    metrics = [json.loads(f.read_text()) for f in sorted(out.glob("fold=*/metrics.json"))]
    single = [one_gpu_seconds(m) for m in metrics if m["world_size"] == 1]
    mean_single = sum(single) / len(single) if single else None
    one_gpu_total = sum(one_gpu_seconds(m) if m["world_size"] == 1 else mean_single for m in metrics)
    gpus = max(1, n_gpus)
    for m in metrics:
        print(f"fold {m['fold']}: {m['world_size']} GPU(s), fold {m['fold_seconds']:.1f}s, "
              f"training {m['train_seconds']:.1f}s, {m['train_samples_per_s']:.2f} samples/s, "
              f"{recompilations_text(m)}")
    eff = one_gpu_total / (gpus * wall)
    print(f"wall {wall:.1f}s on {gpus} GPU(s); sum of one-GPU fold times {one_gpu_total:.1f}s; "
          f"parallel efficiency {eff:.3f}")
    runs = breakdown(read_run_logs(out), t0_wall)
    overheads = mean_overheads(runs)
    print("where the wall time went, per run of a fold (start: trial, workers, model load; after: prediction and "
          "files):")
    print(format_breakdown(runs))
    print("mean per run: " + ", ".join(f"{k} {v:.1f}" for k, v in overheads.items() if v is not None))
    (out / "efficiency.json").write_text(json.dumps({"wall_s": wall, "gpus": gpus, "efficiency": eff,
                                                          "one_gpu_total_s": one_gpu_total, "folds": metrics,
                                                          "runs": runs, "mean_overheads": overheads}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
