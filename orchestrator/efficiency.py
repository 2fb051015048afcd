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

``--predict-rows N``: then, in this process, the first fold's model predicts the first N rows of the run's data twice
as ``orchestrator.predict`` does (the first pass compiles, the second is the steady rate), once as the run is
configured and once more for each ``--predict-also key=value[,key=value]`` (predict's overrides), and each steady
rows/s is set against the fold's steady training samples/s (:mod:`orchestrator.perf.predict_rate`).

Example::

    python -m orchestrator.efficiency --config configs/gemma2_9b_fast.yaml --folds 0-4 --out /tmp/eff \\
        model.init=random model.tokenizer=bytes data.max_rows=600
    python -m orchestrator.efficiency --config configs/gemma2_9b_fast.yaml --folds 0 --out /tmp/eff \\
        model.init=random model.tokenizer=bytes data.max_rows=1200 --predict-rows 1000 \\
        --predict-also model.fp8_predict=true
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
from orchestrator.runs.overrides import parse_predict_overrides
from orchestrator.runs.staging import run_files, staged, with_adapters
from trainer_core.config import ConfigError, load_config


def one_gpu_seconds(m: dict) -> float:
    """What the fold would take alone in one run: all its training plus one model load and one prediction (those of
    its last run). A fold trained in pieces (cluster.rotate_folds) loaded the model once per piece: only once counts."""
    if m.get("last_run_seconds") is None:
        return m["fold_seconds"]
    return m["train_seconds"] + m["last_run_seconds"] - m["last_run_train_seconds"]


def recompilations_text(m: dict) -> str:
    """The fold's torch.compile recompilations (its last run's; ``trainer_core.fastpath.recompiles``), and its compile
    helpers when it had some (how many, seconds from their start until the fold could place its model)."""
    n = m.get("recompilations")
    text = "recompilations not counted" if n is None else f"{n} recompilation{'s' * (n != 1)}"
    helpers = m.get("compile_helpers")  # cluster.compile_helpers (trainer_core.fold.warm_compile)
    if helpers:
        failed = f", {helpers['compile_helpers_failed']} failed" if helpers["compile_helpers_failed"] else ""
        text += f", {helpers['compile_helpers']} compile helpers until {helpers['compile_helpers_s']:.1f}s{failed}"
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.efficiency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="config to run")
    p.add_argument("--folds", default="0-4", help="folds (default 0-4)")
    p.add_argument("--out", required=True,
                   help="run directory: new, empty, or an earlier run's (wiped first: cv --restart, which refuses any "
                        "other folder); a folder or a URI (s3://bucket/prefix, gs://..., as cv --out)")
    p.add_argument("--predict-rows", type=int, default=0, metavar="N",
                   help="after the run: the first fold's model predicts the first N rows of the run's data twice "
                        "(compiling, then steady) and its steady rows/s is set against the fold's steady training "
                        "samples/s (default 0: no prediction)")
    p.add_argument("--predict-also", action="append", default=[], metavar="key=value[,key=value]",
                   help="with --predict-rows: one more prediction with these overrides of predict's (e.g. "
                        "model.fp8_predict=true); repeatable")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = p.parse_intermixed_args(argv)
    try:  # a bad config or override is one line, before any weights are built (cv itself checks everything else)
        cfg = load_config(args.config, args.overrides)
        variants = [("as the run is configured", {})] + [(v, parse_predict_overrides(v.split(",")))
                                                          for v in args.predict_also]
        if args.predict_rows < 0 or (args.predict_also and not args.predict_rows):
            raise ConfigError("--predict-rows: a number of rows >= 1 (--predict-also needs it)")
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
    keep = with_adapters if args.predict_rows else run_files  # a fold model to load: its weights too
    with staged(args.out, keep=keep, write_back=True) as out:  # a run at a URI: its files, efficiency.json back
        return _measure(out, wall, t0_wall, n_gpus, args.predict_rows, variants)


def _measure(out: Path, wall: float, t0_wall: float, n_gpus: int, predict_rows: int = 0,
             variants: list[tuple[str, dict]] | None = None) -> int:
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
    predictions = _predict_rates(out, metrics, runs, predict_rows, variants or [])
    (out / "efficiency.json").write_text(json.dumps({"wall_s": wall, "gpus": gpus, "efficiency": eff,
                                                          "one_gpu_total_s": one_gpu_total, "folds": metrics,
                                                          "runs": runs, "mean_overheads": overheads,
                                                          "predict": predictions}, indent=2))
    return 0


def _predict_rates(out: Path, metrics: list[dict], runs: list[dict], n_rows: int,
                   variants: list[tuple[str, dict]]) -> list:
    """``--predict-rows``: the first fold's model, each variant (its name, predict's overrides) in turn (printed,
    returned)."""
    if not (n_rows and variants and metrics):
        return []
    from orchestrator.perf.predict_rate import format_rate, measure, steady_training_rate
    from orchestrator.runs.overrides import run_config

    first = metrics[0]
    run_row = next((r for r in reversed(runs) if r["fold"] == first["fold"]), {})
    training = steady_training_rate(run_config(out), run_row, first["world_size"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results = []
    for name, over in variants:
        r = {"variant": name, **measure(out, first["fold"], n_rows, over, device)}
        print(format_rate(r, training, card))
        results.append({**r, "training_samples_per_s": training,
                        "ratio": r["rows_per_s"] / training if training else None})
    return results


if __name__ == "__main__":
    sys.exit(main())
