"""Sweep hyperparameters on Ray: each trial is a set of dotted overrides of one base config and runs the requested
folds through the same fold path as ``orchestrator.cv``; trials run concurrently as the cluster allows, ASHA stops bad
ones early on their interim held-out log loss, and the sweep ends with a leaderboard and a runnable ``best.yaml``.

Examples::

    python -m orchestrator.tune --config configs/gemma2_9b_qlora.yaml --folds 0 --num-samples 16 --address auto
    python -m orchestrator.tune --config configs/gemma2_9b_qlora.yaml --folds 0 --num-samples 16 \\
        --space configs/sweeps/lr_rank_freeze.yaml --search optuna --scheduler asha --out runs/g9b-sweep
    python -m orchestrator.tune --config configs/smoke.yaml --num-samples 4 data.max_rows=80  # its own space
    python -m orchestrator.cv --config runs/g9b-sweep/best.yaml --folds 0-4      # then: all folds with the winner

With ``--scheduler asha`` folds evaluate every ``train.eval_every`` steps (set to about a quarter of a fold when the
config leaves it null) on a fixed subset of the held-out fold - its first ``train.interim_eval_rows`` rows by id - and
ASHA compares trials at equal optimizer steps. A trial's final score is always its folds' combined OOF log loss.

Rerunning the same command with the same ``--out`` resumes an interrupted sweep: finished trials are kept, unfinished
ones continue (finished folds skipped, others from their last checkpoint). A sweep directory that holds a different
config, data file, space or search setting is refused. ``--out`` may be a URI on object storage (s3://, gs://, any
scheme pyarrow or fsspec serves), as for ``orchestrator.cv``: trials, checkpoints and Tune's state live there.

Without ``--space`` a config gets its own space, ``sweeps/<config name>.yaml`` beside it (``configs/sweeps/smoke.yaml``
for ``configs/smoke.yaml``), else ``configs/sweeps/lr_rank_freeze.yaml`` (sized for Gemma-2 9B). Every searched value
is checked against the model's real layer count before Ray starts: a value that cannot train is refused, not drawn.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from orchestrator.cluster import interrupt  # signals only: Ray is imported once the input is known to be good
from orchestrator.cv import REPO_ROOT, resolve_config
from orchestrator.runs.data import load_run_data, write_data_parquet
from orchestrator.runs.staging import RunDir, open_run
from orchestrator.runs.storage import StorageError, ray_storage
from orchestrator.sweep.space import SpaceError, load_space, n_trials, space_fingerprint
from trainer_core.config import ConfigError, apply_overrides, to_yaml
from trainer_core.data.arena import DataError, parse_folds
from trainer_core.data.batching import per_rank_batch, planned_steps
from trainer_core.data.soft_labels import check_soft_labels
from trainer_core.data.train_rows import fold_training_rows, load_extra_rows
from trainer_core.model.weights import WeightsError, check_weights
from trainer_core.paths import atomic_write_json

DEFAULT_SPACE = REPO_ROOT / "configs" / "sweeps" / "lr_rank_freeze.yaml"
EVALS_PER_FOLD = 4  # interim evaluations + the final one, when ASHA needs train.eval_every and none was given


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="base YAML config that every trial overrides")
    p.add_argument("--folds", default="0", help="folds each trial trains, one after another: 0, 0-4, 0,2 (default: 0)")
    p.add_argument("--num-samples", type=int, default=8,
                   help="trials to draw (default 8); with grid keys each sample runs the whole grid")
    p.add_argument("--space", type=Path, default=None,
                   help=f"search space YAML of dotted keys (default: the config's own space, sweeps/<config name>.yaml "
                        f"beside the config, e.g. configs/sweeps/smoke.yaml for configs/smoke.yaml; else "
                        f"{DEFAULT_SPACE.relative_to(REPO_ROOT)}: train.lr, lora.r, lora.freeze_layers for Gemma-2 "
                        f"9B's 42 layers)")
    p.add_argument("--search", choices=["random", "optuna"], default="random",
                   help="random (random draws plus grid keys; no extra packages) or optuna (TPE; needs "
                        "pip install .[optuna]); default: random")
    p.add_argument("--scheduler", choices=["asha", "none"], default="asha",
                   help="asha stops trials whose interim held-out log loss trails the others at the same step; "
                        "none runs every trial to the end (default: asha)")
    p.add_argument("--out", default=None,
                   help="the sweep directory (default: runs/<experiment>-sweep): a folder or a URI on object storage "
                        "(s3://bucket/prefix, gs://..., as cv --out); rerun with the same --out to resume")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto' = the one running here); default: start a local cluster")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the base config (before the search space), e.g. data.path=train.csv")
    return p


def auto_eval_every(cfg, rows, folds: list[int]) -> tuple[int, int]:
    """(optimizer steps of the shortest requested fold, eval_every giving about EVALS_PER_FOLD evaluations)."""
    c = cfg.cluster
    world = c.gpus_per_fold if c.gpus_per_fold > 0 else c.cpu_workers_per_fold
    t = cfg.train
    extra = load_extra_rows(cfg.data.extra_train_path)  # extra and swapped rows lengthen a fold: count them too
    n_train = min(len(fold_training_rows(rows, k, extra, t.swap_augment).rows) for k in folds)
    steps = planned_steps(n_train, per_rank_batch(t.batch_size, world), world, t.epochs, t.grad_accum, t.max_steps)[1]
    return steps, max(1, math.ceil(steps / EVALS_PER_FOLD))


def default_space(config_path: Path) -> Path:
    """The search space a config gets without --space: ``sweeps/<config stem>.yaml`` beside it, else DEFAULT_SPACE."""
    own = config_path.parent / "sweeps" / f"{config_path.stem}.yaml"
    return own if own.is_file() else DEFAULT_SPACE


def claim_sweep_dir(sweep: RunDir, meta: dict, rows) -> bool:
    """Check or claim the sweep directory; returns True when an earlier sweep there can be resumed. One at a URI is
    pulled first (all but checkpoints and weights), unless it holds something other than a sweep."""
    from ray.tune import Tuner

    if sweep.remote:
        names = sweep.top_names()
        if names and "sweep.json" not in names:
            raise ConfigError(f"{sweep.location} is not empty and holds no sweep.json ({', '.join(names[:5])}); "
                              f"choose an empty or new --out")
        sweep.pull()
    sweep_dir = sweep.local
    meta_path = sweep_dir / "sweep.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        names = {"fingerprint": "config", "data_sha256": "data file", "space_fingerprint": "search space",
                 "folds": "folds", "search": "--search", "scheduler": "--scheduler", "num_samples": "--num-samples"}
        changed = [names[k] for k in names if old.get(k) != meta[k]]
        if changed:
            raise ConfigError(f"{sweep.location} holds a sweep with a different {', '.join(changed)}; rerun it with "
                              f"the same settings to resume, or use another --out")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_data_parquet(sweep_dir, rows)
    atomic_write_json(meta_path, meta)
    path, fs = ray_storage(sweep.location, "ray")
    return Tuner.can_restore(f"{path}/tune", storage_filesystem=fs)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_intermixed_args(argv)  # overrides may come before or after flags
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.num_samples < 1:
        print("error: --num-samples must be >= 1", file=sys.stderr)
        return 2
    if args.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            print("error: --search optuna needs the optional optuna package: pip install .[optuna] "
                  "(or use --search random)", file=sys.stderr)
            return 2
    try:
        base = resolve_config(args)
        args.space = args.space or default_space(args.config)
        check_weights(base.model)  # model and tokenizer found (or downloaded) before anything is written
        space = load_space(args.space, base, args.search)
        print(f"search space: {args.space}")
        folds = parse_folds(args.folds, base.data.n_folds)
        data = load_run_data(base)
        if base.train.soft_labels:  # refused here, before Ray, rather than in every trial
            check_soft_labels(base.train.soft_labels, data.rows, folds, base.data.n_folds)
    except (ConfigError, SpaceError, DataError, WeightsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # ASHA needs interim evaluations; set eval_every only where the user did not (it stays out of best.yaml).
    rows = data.rows
    steps, eval_every = auto_eval_every(base, rows, folds)
    trial_base = base
    if args.scheduler == "asha":
        if base.train.eval_every is None:
            trial_base = apply_overrides(base, {"train.eval_every": eval_every})
        eval_every = trial_base.train.eval_every
        if eval_every >= steps:
            print(f"warning: folds run {steps} steps and train.eval_every={eval_every}: no interim evaluation, "
                  f"so ASHA cannot stop any trial early", file=sys.stderr)
    data_sha = data.sha256
    meta = {"experiment": base.experiment, "fingerprint": trial_base.fingerprint(), "data_path": base.data.path,
            "data_sha256": data_sha, "space_fingerprint": space_fingerprint(space),
            "space": {k: {p.kind: list(p.values)} for k, p in space.items()}, "folds": folds,
            "search": args.search, "scheduler": args.scheduler, "num_samples": args.num_samples,
            "eval_every": trial_base.train.eval_every, "command": " ".join(["python -m orchestrator.tune", *argv]),
            **data.notes}
    try:
        sweep = open_run(args.out or Path("runs") / f"{base.experiment}-sweep")
    except StorageError as e:
        print(f"error: --out {e}", file=sys.stderr)
        return 2
    try:
        resumable = claim_sweep_dir(sweep, meta, rows)
        (sweep.local / "config.yaml").write_text(to_yaml(trial_base))
        sweep.push()
        return run(args, base, trial_base, space, folds, sweep, data_sha, steps, resumable)
    except (ConfigError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once
        print(f"\nsweep {interrupt.MESSAGE}", file=sys.stderr)
        return interrupt.EXIT_CODE
    finally:
        sweep.close()


def run(args, base, trial_base, space, folds, sweep: RunDir, data_sha: str, steps: int, resumable: bool) -> int:
    """The sweep on Ray; what the driver writes into a sweep directory at a URI is uploaded however it ends."""
    with sweep.pushed_however_it_ends():
        return _run(args, base, trial_base, space, folds, sweep, data_sha, steps, resumable)


def _run(args, base, trial_base, space, folds, sweep: RunDir, data_sha: str, steps: int, resumable: bool) -> int:
    # Ray is imported only once the config, space and data are known to be good.
    from orchestrator import tracking
    from orchestrator.cluster import folds as ray_folds
    from orchestrator.cluster import schedule
    from orchestrator.cluster import sweep_trials as ray_sweep
    from orchestrator.sweep import leaderboard as lb
    from orchestrator.sweep.space import to_param_space

    total = n_trials(space, args.num_samples) if args.search == "random" else args.num_samples
    try:
        resources = ray_folds.init_ray(base.cluster.address, base.cluster.num_cpus)
        interrupt.install()  # after ray.init, which replaces SIGTERM's handler
        concurrency = schedule.plan_concurrency(trial_base, resources, total)
    except schedule.ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(f"{'resuming' if resumable else 'starting'} sweep of {total} trials x folds {folds} on Ray "
          f"({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs): {concurrency} at a time; "
          f"scheduler {args.scheduler}, search {args.search}; sweep directory {sweep.show()}")
    t0 = time.time()
    sweep_dir = sweep.local  # the sweep directory, or a URI's staging folder
    tracking.start(trial_base, sweep_dir, kind="sweep", folds=folds)  # one MLflow / W&B run per trial
    scheduler = ray_sweep.build_scheduler(args.scheduler, trial_base.train.eval_every, steps * len(folds))
    results = ray_sweep.run_sweep(trial_base.to_dict(), to_param_space(space), sweep, folds, data_sha,
                                  num_samples=args.num_samples, concurrency=concurrency, search=args.search,
                                  scheduler=scheduler, restore=resumable)
    if interrupt.requested():
        ray_folds.shutdown_ray()  # the trials have stopped; their checkpoints and Tune's state are on disk
    sweep.pull()  # the trials' reports, uploaded by the trials
    records = ray_sweep.trial_records(results)
    keys = list(space)
    board = lb.build_leaderboard(records, keys, folds, sweep_dir)
    lb.write_leaderboard(board, sweep_dir / "leaderboard.csv")
    best = lb.best_trial(board)
    print()
    print(lb.format_leaderboard(board, keys))
    for r in records:
        if r["error"]:
            print(f"trial {r['trial_id']} failed: {r['error']}", file=sys.stderr)
    unfinished = sum(r["status"] == "unfinished" for r in records)
    if best is not None:
        lb.write_best_yaml(base, best, keys, folds, sweep_dir / "best.yaml")
        print(f"\nbest: trial {best['trial']}  OOF log loss {best['log_loss']:.4f}  -> {sweep.show('best.yaml')}")
    tracking.finish(sweep_dir, None, [sweep_dir / "leaderboard.csv", sweep_dir / "best.yaml"],
                    figures={"best_log_loss": best["log_loss"]} if best is not None else None)
    sweep.push()  # before the console names them
    if not unfinished:
        sweep.tidy()  # every trial is over: what a killed worker's upload left behind goes
    print(f"leaderboard: {sweep.show('leaderboard.csv')}  ({time.time() - t0:.0f}s)")
    if unfinished or interrupt.requested():
        print(f"sweep {interrupt.MESSAGE} ({sweep.show()})", file=sys.stderr)
        return interrupt.EXIT_CODE
    if best is None:
        print("no trial completed (errors above; a rerun retries failed trials)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
