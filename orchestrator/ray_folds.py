"""Folds on Ray: one Ray Tune trial per fold (concurrency = what the cluster holds), each trial a Ray Train
``TorchTrainer`` with one worker per GPU (or CPU workers) that calls ``trainer_core.fold.train_fold``.

Ray Train V2 (Ray >= 2.51) cannot be passed to a Tuner directly: a trial is a function that builds a TorchTrainer and
calls ``fit()``; ``TuneReportCallback`` forwards the workers' reports to Tune. Each fold's Train run is named
``fold=<k>`` under ``<run_dir>/ray``, so a rerun of the same run directory resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

# Quieter, faster Ray on small machines; each can still be overridden from the environment.
for _k, _v in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",  # variable-length batches fragment the cache
}.items():
    os.environ.setdefault(_k, _v)

import ray  # noqa: E402
import ray.train  # noqa: E402
import ray.tune  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from orchestrator.progress import Progress  # noqa: E402
from orchestrator.schedule import TRIAL_DRIVER_CPU  # noqa: E402
from trainer_core.config import Config, config_from_dict  # noqa: E402

log = logging.getLogger(__name__)
# A trial's driver, and with it the Ray Train controller (Ray places it on the driver's node), runs on the head node:
# losing the head loses the cluster anyway (the GCS runs there), and losing any other node then costs only the Train
# workers on it, which Ray Train restarts from the fold's last checkpoint. A driver on the lost node would take the
# fold down for good ("the actor's node was terminated unexpectedly"). The custom resource also keeps Tune from
# refusing an empty request. Tests: test_multinode.py.
TRIAL_RESOURCES = {"cpu": TRIAL_DRIVER_CPU, "node:__internal_head__": 0.001}


def init_ray(address: str | None, num_cpus: int | None, log_dir: Path | None = None) -> dict:
    """Join ``address`` or start a local cluster; returns the cluster's total resources."""
    if not ray.is_initialized():
        kwargs: dict = dict(logging_level=logging.WARNING, log_to_driver=False, configure_logging=True)
        if address:
            ray.init(address=address, **kwargs)
        else:
            # The dashboard starts where ray[default] is installed: Train V2 frees the placement groups of stopped
            # trials through the State API, which needs it.
            dash = os.environ.get("ORCHESTRATOR_RAY_DASHBOARD")  # "0" starts without it (to test that path)
            ray.init(num_cpus=num_cpus, include_dashboard=None if dash is None else dash == "1", **kwargs)
    # Tune logs every failed trial's full traceback at ERROR; cv prints the root cause and keeps the traceback on disk.
    logging.getLogger("ray.tune.execution.tune_controller").setLevel(logging.CRITICAL)
    logging.getLogger("ray.tune.tune").setLevel(logging.CRITICAL)
    return ray.cluster_resources()


def link_ray_logs(run_dir: Path) -> Path | None:
    """``<run_dir>/logs/ray`` -> this Ray session's log folder (every worker's stdout/stderr), so the full logs of a
    run are reachable from its run directory while the console stays quiet."""
    try:
        session = Path(ray._private.worker._global_node.get_session_dir_path())  # noqa: SLF001 - no public API
    except Exception:  # noqa: BLE001 - a joined cluster may not expose it; the link is a convenience
        return None
    link = run_dir / "logs" / "ray"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(session / "logs", target_is_directory=True)
    return link


def fold_worker(config: dict) -> dict:
    """Runs on every Ray Train worker of one fold: a thin adapter around ``trainer_core.fold.train_fold``."""
    import pandas as pd
    import torch

    from trainer_core.fold import train_fold

    cfg = config_from_dict(config["cfg"])
    fold, run_dir = config["fold"], Path(config["run_dir"])
    if cfg.cluster.gpus_per_fold == 0:
        torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))  # a packed CPU fold uses all it reserved
    rows = pd.read_parquet(run_dir / "data.parquet")

    def report(metrics: dict, ckpt_dir: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)

    resume_dir = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        resume_dir = Path(tempfile.mkdtemp(prefix=f"fold{fold}-resume-"))
        checkpoint.to_directory(str(resume_dir))
    try:
        result = train_fold(cfg, fold, rows, run_dir / f"fold={fold}", resume_from=resume_dir, report=report,
                            tb_dir=run_dir / "tensorboard" / f"fold={fold}", device=ray.train.torch.get_device(),
                            stop_at=config.get("stop_at"))
    finally:
        if resume_dir is not None:
            shutil.rmtree(resume_dir, ignore_errors=True)
    return {"paused": True} if result is None else result.metrics.to_dict()


def build_trainer(cfg: Config, fold: int, run_dir: Path, callbacks: list | None = None,
                  stop_at: float | None = None) -> TorchTrainer:
    c = cfg.cluster
    use_gpu = c.gpus_per_fold > 0
    scaling = ray.train.ScalingConfig(
        num_workers=c.gpus_per_fold if use_gpu else c.cpu_workers_per_fold,
        use_gpu=use_gpu,
        resources_per_worker={"CPU": c.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
    )
    return TorchTrainer(
        fold_worker,
        train_loop_config={"cfg": cfg.to_dict(), "fold": fold, "run_dir": str(run_dir), "stop_at": stop_at},
        scaling_config=scaling,
        run_config=ray.train.RunConfig(
            name=f"fold={fold}",  # stable: a rerun finds this fold's checkpoints
            storage_path=str((run_dir / "ray").resolve()),
            failure_config=ray.train.FailureConfig(max_failures=c.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=callbacks or [],
        ),
    )


def fold_trial(config: dict) -> None:
    """One Tune trial = one fold's Ray Train run."""
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = config_from_dict(config["cfg"])
    stop_at = config.get("stops", {}).get(str(config["fold"]))  # a piece of a rotated schedule, else None
    trainer = build_trainer(cfg, config["fold"], Path(config["run_dir"]), callbacks=[TuneReportCallback()],
                            stop_at=stop_at)
    trainer.fit()  # raises TrainingFailedError after cluster.max_failures restarts; Tune marks the trial errored


def state_api_available() -> bool:
    """Whether Ray's State API answers (it needs the dashboard, from ray[default])."""
    try:
        from ray.util.state import list_actors

        list_actors(limit=1, timeout=10, raise_on_missing_output=False)
        return True
    except Exception:  # noqa: BLE001 - any failure means Train cannot use it either
        return False


def remove_leftover_placement_groups() -> int:
    """Remove every live placement group of this (private, local) cluster; returns how many."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    n = 0
    for pg_hex, info in ray.util.placement_group_table().items():
        if info.get("state") in ("CREATED", "PENDING", "RESCHEDULING"):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex))))
            n += 1
    return n


def run_folds(cfg: Config, folds: list[int], run_dir: Path, concurrency: int,
              stops: dict[int, float | None] | None = None) -> dict[int, str | None]:
    """Train ``folds`` as concurrent Tune trials; returns {fold: None if it finished (or paused at its ``stops``
    fraction, a piece of a rotated schedule), else the error text}.

    Without the State API (no dashboard), Ray 2.60's Train V2 leaves each finished run's worker placement group
    reserved, and later folds wait for resources forever. Then, on a cluster this process started, folds run in waves
    of ``concurrency`` and leftover placement groups are removed between waves."""
    if not folds:
        return {}
    if not state_api_available():
        if cfg.cluster.address:
            log.warning("Ray's State API is not available on %s (install ray[default] there): placement groups of "
                        "finished folds may never be freed", cfg.cluster.address)
        else:
            print(f"Ray dashboard not running: folds train in waves of {concurrency}, placement groups freed between "
                  f"waves (install ray[default] for continuous scheduling)")
            out: dict[int, str | None] = {}
            for i in range(0, len(folds), concurrency):
                out.update(_tune_folds(cfg, folds[i:i + concurrency], run_dir, concurrency, stops))
                remove_leftover_placement_groups()
            return out
    return _tune_folds(cfg, folds, run_dir, concurrency, stops)


def _tune_folds(cfg: Config, folds: list[int], run_dir: Path, concurrency: int,
                stops: dict[int, float | None] | None = None) -> dict[int, str | None]:
    storage = (run_dir / "ray").resolve()
    shutil.rmtree(storage / "folds", ignore_errors=True)  # Tune's own bookkeeping; Train checkpoints live beside it
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(fold_trial, TRIAL_RESOURCES),
        param_space={"cfg": cfg.to_dict(), "run_dir": str(run_dir.resolve()), "fold": ray.tune.grid_search(folds),
                     "stops": {str(f): v for f, v in (stops or {}).items()}},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrency),
        run_config=ray.tune.RunConfig(name="folds", storage_path=str(storage), verbose=0,
                                      callbacks=[Progress(len(folds), concurrency)],
                                      failure_config=ray.tune.FailureConfig(max_failures=0)),
    )
    results = tuner.fit()
    out: dict[int, str | None] = {}
    for r in results:
        fold = r.config["fold"]
        if r.error is None:
            out[fold] = None
            continue
        full = str(r.error)
        log_path = run_dir / "logs" / f"fold={fold}.error.txt"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(full)
        out[fold] = f"{root_cause(full)} (full traceback: {log_path})"
    return out


def root_cause(text: str) -> str:
    """The innermost exception line of a Ray error text, e.g. "ValueError: ..." rather than Ray's wrappers."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    causes = [ln for ln in lines if ":" in ln and ln.split(":", 1)[0].replace(".", "").isidentifier()
              and ln.split(":", 1)[0].split(".")[-1].endswith(("Error", "Exception", "Interrupt"))
              and "WorkerGroupError" not in ln and "RayTaskError" not in ln]
    return causes[-1] if causes else (lines[-1] if lines else "unknown error")
