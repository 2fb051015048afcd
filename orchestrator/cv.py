"""Cross-validate a preference classifier on Ray: every requested fold trains concurrently, then one OOF report.

Examples::

    python -m orchestrator.cv --folds 0-4                                   # embedded demo (CPU, real MiniLM)
    python -m orchestrator.cv --config configs/smoke.yaml --folds 0,2 train.lr=1e-3
    python -m orchestrator.cv --config configs/gemma2_9b_qlora.yaml --folds 0-4 --address auto --out runs/g9b
    python -m orchestrator.cv --config configs/gemma2_9b_qlora.yaml --folds 0-4 --address auto --out s3://bucket/g9b
    python -m orchestrator.cv --config configs/gemma2_9b_qlora.yaml --print-config --format json

Rerunning the same command with the same ``--out`` resumes: finished folds (checked by their files) are skipped,
unfinished ones continue from their last checkpoint. A different config or data file for that directory is refused
unless ``--restart`` is given. ``--out`` may be a URI on object storage (s3://, gs://, any scheme pyarrow or fsspec
serves; an S3-compatible endpoint through AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL): the run directory then lives
there, resumes from there, and every node of the cluster reads and writes it there (orchestrator/runs/staging.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from orchestrator.cluster import interrupt  # signals only: Ray is imported once the input is known to be good
from orchestrator.cluster.schedule import ClusterError
from orchestrator.runs.rundir import RunDirError, prepare_run_dir
from orchestrator.runs.staging import RunDir, open_run
from orchestrator.runs.storage import StorageError
from trainer_core.config import ConfigError, field_docs, inert_note, load_config, to_yaml, validate
from trainer_core.data.arena import DataError, parse_folds
from trainer_core.model.weights import WeightsError, check_weights, model_fit_problem

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo_cpu.yaml"
log = logging.getLogger("orchestrator.cv")


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help=f"YAML config (default: {DEFAULT_CONFIG.relative_to(REPO_ROOT)}, the embedded CPU demo)")
    p.add_argument("--folds", default="0-4", help="folds to train: 0-4, 0,2,4, 3 or all (default: 0-4)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto' = the one running here); default: start a local cluster")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--format", choices=["yaml", "json"], default="yaml", help="--print-config's format (default yaml)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides applied after --config, e.g. train.lr=1e-4 data.path=my.csv")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.cv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--out", default=None,
                   help="the run directory itself (default: runs/<experiment>): a folder, or a URI on object storage "
                        "(s3://bucket/prefix, gs://..., any scheme pyarrow or fsspec serves; S3-compatible endpoints "
                        "via AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL); rerun with the same --out to resume")
    p.add_argument("--restart", action="store_true",
                   help="wipe the run directory's results and checkpoints first (needed to reuse it for a new config)")
    return p


def resolve_config(args: argparse.Namespace):
    """Defaults <- --config (or the embedded demo) <- overrides (plus --address), validated."""
    path = args.config or DEFAULT_CONFIG
    cfg = load_config(path, args.overrides)
    if args.address:
        cfg.cluster.address = args.address
    validate(cfg)
    note = inert_note(cfg)  # e.g. model.compile=off on the fast config: said once, on stderr
    if note:
        print(note, file=sys.stderr)
    return cfg


def local_gpu_count() -> int:
    """GPUs this machine has, without starting Ray: torch's count (CUDA_VISIBLE_DEVICES respected, as Ray does)."""
    import torch

    return torch.cuda.device_count()


def check_gpus(cfg, resources: dict | None = None) -> None:
    """ClusterError when folds need more GPUs than there are: this machine's (a local cluster; counted without Ray)
    or, with ``resources``, the joined cluster's (``--address``: only known once connected)."""
    from orchestrator.cluster.schedule import ClusterError, plan_concurrency

    need = cfg.cluster.gpus_per_fold
    if need <= 0:
        return
    if resources is not None:
        plan_concurrency(cfg, resources, 1)
        return
    have = local_gpu_count()
    if have < need:
        raise ClusterError(f"this config trains each fold on {need} GPU(s) (cluster.gpus_per_fold={need}), but this "
                           f"machine has {have} GPU(s) (torch.cuda.device_count()); Ray was not started and nothing "
                           f"was written. Run it on a GPU machine or join a GPU cluster with --address.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_intermixed_args(argv)  # overrides may come before or after flags
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.help_config:
        for key, doc, default in field_docs():
            print(f"{key} = {json.dumps(default)}\n    {doc}")
        return 0
    try:
        cfg = resolve_config(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg) if args.format == "yaml" else json.dumps(cfg.to_dict(), indent=2))
        return 0
    try:
        folds = parse_folds(args.folds, cfg.data.n_folds)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run = open_run(args.out or Path("runs") / cfg.experiment)  # a URI nothing serves stops here, one line
    except StorageError as e:
        print(f"error: --out {e}", file=sys.stderr)
        return 2
    try:
        return _checked_run(args, argv, cfg, folds, run)
    finally:
        run.close()  # a URI's staging folder


def _checked_run(args, argv: list[str], cfg, folds: list[int], run: RunDir) -> int:
    try:
        check_weights(cfg.model)  # model and tokenizer found (or downloaded) before anything is written
        misfit = model_fit_problem(cfg)  # e.g. lora.freeze_layers past the model's real depth
        if misfit:
            print(f"error: {misfit}", file=sys.stderr)
            return 2
        command = " ".join(["python -m orchestrator.cv", *argv])
        rows = prepare_run_dir(cfg, run, folds, args.restart, command, before_write=lambda: _cluster_check(cfg))
    except (DataError, RunDirError, WeightsError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    try:
        return run_cv(cfg, rows, folds, run)
    except KeyboardInterrupt:  # Ctrl-C before Ray started, or a second one
        print(f"\n{interrupt.MESSAGE}", file=sys.stderr)
        return interrupt.EXIT_CODE


def _cluster_check(cfg) -> None:
    """After every input check, before anything is written: enough GPUs? Locally counted without Ray; a joined cluster
    (--address) is only known once connected, so connect first (run_cv's init_ray then finds Ray initialised)."""
    if cfg.cluster.gpus_per_fold <= 0:
        return
    if cfg.cluster.address:
        from orchestrator.cluster import folds as ray_folds

        check_gpus(cfg, ray_folds.init_ray(cfg.cluster.address, cfg.cluster.num_cpus))
    else:
        check_gpus(cfg)


def run_cv(cfg, rows, folds: list[int], run: RunDir) -> int:
    """Train the folds not yet finished, then the report. A run directory at a URI gets what the driver wrote
    (sessions.json, error logs, the report, tracking ids) uploaded however this ends; the folds upload their own."""
    with run.pushed_however_it_ends():
        return _run_cv(cfg, rows, folds, run)


def _run_cv(cfg, rows, folds: list[int], run: RunDir) -> int:
    # Ray is imported only once the config and data are known to be good.
    from orchestrator import tracking
    from orchestrator.cluster import folds as ray_folds
    from orchestrator.cluster import schedule
    from orchestrator.cluster.eta import later_fold_times
    from orchestrator.reporting.recipe import stamp_session
    from orchestrator.reporting.reducer import ReduceError, fold_is_complete, format_table, reduce_run

    run_dir = run.local  # the run directory, or a URI's staging folder
    done = [k for k in folds if fold_is_complete(run_dir, k, rows)]
    todo = [k for k in folds if k not in done]
    if done:
        print(f"folds {done} already finished in {run.show()}; skipping them")
    t0 = time.time()
    tracking.start(cfg, run_dir, folds=folds)  # MLflow / W&B runs, when tracking.* asks for them
    if todo:
        try:
            resources = ray_folds.init_ray(cfg.cluster.address, cfg.cluster.num_cpus)
            interrupt.install()  # after ray.init, which replaces SIGTERM's handler
            if not run.remote:  # a link on this machine into Ray's logs: nothing to upload
                ray_folds.link_ray_logs(run_dir)
            stamp_session(run_dir, cfg, resources, todo)  # start time and GPUs, for the report's recipe
            run.push()
            schedule.plan_concurrency(cfg, resources, len(todo))  # refuses a cluster that cannot run one fold
        except schedule.ClusterError as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
        errors: dict[int, str | None] = {}
        train_rows = int(len(rows) * (cfg.data.n_folds - 1) / cfg.data.n_folds)  # per fold, for rotate_folds=null
        phases = schedule.plan_fold_phases(cfg, todo, resources, train_rows)
        pieces = any(p.stop_at is not None for phase in phases for p in phase.values())  # a rotated schedule
        concurrencies = [schedule.plan_concurrency(cfg, resources, len(ph), next(iter(ph.values())))
                         for ph in phases]
        shares = schedule.phase_shares(phases)  # the share of a fold each piece trains, for the run's ETA
        for i, planned in enumerate(phases):
            phase = {k: p for k, p in planned.items() if errors.get(k) is None}  # a fold that failed stays failed
            if not phase:
                continue
            where = next(iter(phase.values()))  # the folds of a phase share their resources
            concurrency = schedule.plan_concurrency(cfg, resources, len(phase), where)
            stops = ("; pieces: " + ", ".join(f"fold {k} to {'the end' if p.stop_at is None else f'{p.stop_at:.0%}'}"
                                              for k, p in phase.items())) if pieces else ""
            print(f"training folds {list(phase)} on Ray ({resources.get('CPU', 0):g} CPUs, "
                  f"{resources.get('GPU', 0):g} GPUs): {where.describe()}, {concurrency} at a time{stops}; run "
                  f"directory {run.show()}")
            later = later_fold_times(shares[i + 1:], concurrencies[i + 1:])
            errors.update(ray_folds.run_folds(cfg, phase, run, concurrency, later))
            if interrupt.requested():
                break
        if interrupt.requested():  # no later phase, no blame for the folds it stopped
            ray_folds.shutdown_ray()
            print(interrupt.MESSAGE, file=sys.stderr)
            return interrupt.EXIT_CODE
        run.pull()  # the folds' files, uploaded by their workers
        failed = {k: e for k, e in errors.items() if e is not None or not fold_is_complete(run_dir, k, rows)}
        if failed:
            for k, e in sorted(failed.items()):
                print(f"fold {k} failed: {e or 'finished without complete files'}", file=sys.stderr)
            print(f"rerun the same command to resume; finished folds are kept in {run.show()}", file=sys.stderr)
            return 1
    try:
        report = reduce_run(run_dir, folds, location=run.location)
    except ReduceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print()
    print(format_table(report))
    run.push()  # the report, before the trackers and the console name it
    run.tidy()  # every fold is over: what a killed worker's upload left behind goes
    tracking.finish_cv(run_dir, report)
    print(f"\nreport: {run.show('report.html')}\nrun directory: {run.show()}  ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
