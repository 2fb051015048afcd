"""Cross-validate a preference classifier on Ray: every requested fold trains concurrently, then one OOF report.

Examples::

    python -m orchestrator.cv --folds 0-4                                   # embedded demo (CPU, real MiniLM)
    python -m orchestrator.cv --config configs/smoke.yaml --folds 0,2 train.lr=1e-3
    python -m orchestrator.cv --config configs/gemma2_9b_qlora.yaml --folds 0-4 --address auto --out runs/g9b
    python -m orchestrator.cv --config configs/gemma2_9b_qlora.yaml --print-config --format json

Rerunning the same command with the same ``--out`` resumes: finished folds (checked by their files) are skipped,
unfinished ones continue from their last checkpoint. A different config or data file for that directory is refused
unless ``--restart`` is given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from trainer_core.config import ConfigError, field_docs, load_config, to_yaml, validate
from trainer_core.data import DataError, assign_folds, load_rows, parse_folds
from trainer_core.paths import atomic_write, atomic_write_json, atomic_write_text
from trainer_core.train_rows import load_extra_rows

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo_cpu.yaml"
log = logging.getLogger("orchestrator.cv")


class RunDirError(RuntimeError):
    """The run directory belongs to a different config or data file."""


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
    p.add_argument("--out", type=Path, default=None,
                   help="the run directory itself (default: runs/<experiment>); rerun with the same --out to resume")
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
    return cfg


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_meta(cfg, rows, folds: list[int], data_sha256: str, command: str) -> dict:
    """What ``run.json`` records: enough to refuse a run directory that belongs to another config or data file."""
    return {"experiment": cfg.experiment, "fingerprint": cfg.fingerprint(), "data_path": cfg.data.path,
            "n_folds": cfg.data.n_folds, "data_sha256": data_sha256, "n_rows": int(len(rows)), "folds": folds,
            "command": command}


def claim_run_dir(run_dir: Path, cfg, rows, meta: dict, restart: bool) -> None:
    """Check or claim ``run_dir`` for ``meta`` (RunDirError if it holds another config or data file), then write
    ``data.parquet`` once and the resolved ``config.yaml`` and ``run.json``. Shared by cv runs and sweep trials."""
    meta_path = run_dir / "run.json"
    if meta_path.exists() and not restart:
        old = json.loads(meta_path.read_text())
        changed = [k for k in ("fingerprint", "data_sha256") if old.get(k) != meta[k]]
        if changed:
            what = " and ".join({"fingerprint": "config", "data_sha256": "data file"}[k] for k in changed)
            raise RunDirError(f"{run_dir} holds a run with a different {what}; use another --out, or --restart to "
                              f"discard its results")
    if restart and run_dir.exists():
        for child in run_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "data.parquet").exists():
        atomic_write(run_dir / "data.parquet", lambda p: rows.to_parquet(p, index=False))
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    atomic_write_json(meta_path, meta)


def prepare_run_dir(cfg, run_dir: Path, folds: list[int], restart: bool, argv: list[str]):
    """Validate the data (before any Ray work), claim or check the run directory, write data.parquet once.

    Returns the rows with folds assigned."""
    rows = assign_folds(load_rows(cfg.data.path, max_rows=cfg.data.max_rows), cfg.data.n_folds)
    load_extra_rows(cfg.data.extra_train_path)  # each fold reads it again; a bad file must stop the run here
    meta = run_meta(cfg, rows, folds, file_sha256(cfg.data.path), " ".join(["python -m orchestrator.cv", *argv]))
    claim_run_dir(run_dir, cfg, rows, meta, restart)
    return rows


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
    run_dir = (args.out or Path("runs") / cfg.experiment).resolve()
    try:
        rows = prepare_run_dir(cfg, run_dir, folds, args.restart, argv)
    except (DataError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_cv(cfg, rows, folds, run_dir)


def run_cv(cfg, rows, folds: list[int], run_dir: Path) -> int:
    # Ray is imported only once the config and data are known to be good.
    from orchestrator import ray_folds, schedule
    from orchestrator.reducer import ReduceError, fold_is_complete, format_table, reduce_run

    done = [k for k in folds if fold_is_complete(run_dir, k, rows)]
    todo = [k for k in folds if k not in done]
    if done:
        print(f"folds {done} already finished in {run_dir}; skipping them")
    t0 = time.time()
    if todo:
        try:
            resources = ray_folds.init_ray(cfg.cluster.address, cfg.cluster.num_cpus)
            ray_folds.link_ray_logs(run_dir)
            schedule.plan_concurrency(cfg, resources, len(todo))  # refuses a cluster that cannot run one fold
        except schedule.ClusterError as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
        errors = {}
        for phase_folds, phase_cfg, stops in schedule.plan_fold_phases(cfg, todo, resources):
            phase_folds = [k for k in phase_folds if errors.get(k) is None]  # a fold that failed stays failed
            if not phase_folds:
                continue
            concurrency = schedule.plan_concurrency(phase_cfg, resources, len(phase_folds))
            c = phase_cfg.cluster
            where = (f"{c.gpus_per_fold} GPU(s) each" if c.gpus_per_fold else
                     f"{c.cpu_workers_per_fold} CPU worker(s) x {c.cpus_per_worker:g} CPUs each")
            pieces = ("; pieces: " + ", ".join(f"fold {k} to {'the end' if stops[k] is None else f'{stops[k]:.0%}'}"
                                               for k in phase_folds)) if stops else ""
            print(f"training folds {phase_folds} on Ray ({resources.get('CPU', 0):g} CPUs, "
                  f"{resources.get('GPU', 0):g} GPUs): {where}, {concurrency} at a time{pieces}; run directory "
                  f"{run_dir}")
            errors.update(ray_folds.run_folds(phase_cfg, phase_folds, run_dir, concurrency, stops))
        failed = {k: e for k, e in errors.items() if e is not None or not fold_is_complete(run_dir, k, rows)}
        if failed:
            for k, e in sorted(failed.items()):
                print(f"fold {k} failed: {e or 'finished without complete files'}", file=sys.stderr)
            print(f"rerun the same command to resume; finished folds are kept in {run_dir}", file=sys.stderr)
            return 1
    try:
        report = reduce_run(run_dir, folds)
    except ReduceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print()
    print(format_table(report))
    print(f"\nrun directory: {run_dir}  ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
