"""Folds on Ray: one Ray Tune trial per fold (concurrency = what the cluster holds), each trial a Ray Train
``TorchTrainer`` with one worker per GPU (or CPU workers) that calls ``trainer_core.fold.loop.train_fold``.

Ray Train V2 (Ray >= 2.51) cannot be passed to a Tuner directly: a trial is a function that builds a TorchTrainer and
calls ``fit()``; ``TuneReportCallback`` forwards the workers' reports to Tune. Each fold's Train run is named
``fold=<k>`` under ``<run_dir>/ray``, so a rerun of the same run directory resumes from its last checkpoint. A run
directory at a URI is Ray's ``storage_path`` there, with its ``storage_filesystem`` (``orchestrator.runs.storage``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray
import ray.train
import ray.tune
from ray.train.torch import TorchTrainer

from orchestrator import tracking
from orchestrator.cluster import interrupt
from orchestrator.cluster.address import SETUP_HOOK
from orchestrator.cluster.errors import root_cause
from orchestrator.cluster.progress import Progress
from orchestrator.cluster.schedule import TRIAL_DRIVER_CPU, Phase, Placement, base_placement
from orchestrator.cluster.worker import fold_worker
from orchestrator.runs import storage
from orchestrator.runs.compile_cache import compile_cache_dir
from orchestrator.runs.staging import RunDir
from trainer_core.config import Config, config_from_dict

log = logging.getLogger(__name__)
# A trial's driver, and with it the Ray Train controller (Ray places it on the driver's node), runs on the head node:
# losing the head loses the cluster anyway (the GCS runs there), and losing any other node then costs only the Train
# workers on it, which Ray Train restarts from the fold's last checkpoint. A driver on the lost node would take the
# fold down for good ("the actor's node was terminated unexpectedly"). The custom resource also keeps Tune from
# refusing an empty request. Tests: test_multinode.py.
TRIAL_RESOURCES = {"cpu": TRIAL_DRIVER_CPU, "node:__internal_head__": 0.001}

# Quieter, faster Ray on small machines. Each is a default: a value set in the environment wins. Nothing is set when
# this module is imported; init_ray applies them. Read by this process (the driver), and on a local cluster by the Ray
# processes it starts:
DRIVER_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
}
# Read inside Ray workers (trial drivers, Train controllers, Train workers): passed as the job's runtime_env, which
# reaches every node, those of a cluster joined with --address included.
WORKER_ENV = {
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",  # variable-length batches fragment the cache
}


def worker_env(environ: dict | None = None) -> dict[str, str]:
    """The environment variables for Ray workers: :data:`WORKER_ENV`, each overridden by ``environ``'s value, plus
    where the object store is (``storage.STORAGE_ENV``: endpoint and region, never credentials) when set here."""
    environ = os.environ if environ is None else environ
    return {**{k: environ.get(k, v) for k, v in WORKER_ENV.items()},
            **{k: environ[k] for k in storage.STORAGE_ENV if environ.get(k)}}


def init_ray(address: str | None, num_cpus: int | None) -> dict:
    """Join ``address`` or start a local cluster; returns the cluster's total resources.

    Sets :data:`DRIVER_ENV`'s defaults in this process first and gives the workers :func:`worker_env` and
    ``RAY_ADDRESS`` = this cluster (:mod:`orchestrator.cluster.address`), so other Ray clusters on the machine change
    nothing. Without ``address`` a new local cluster starts even where ``RAY_ADDRESS`` is set or another one runs.
    Ray's own authentication is left as Ray and the user set it (Ray 2.60: token authentication on for a new local
    cluster)."""
    if not ray.is_initialized():
        for key, value in DRIVER_ENV.items():
            os.environ.setdefault(key, value)
        kwargs: dict = dict(logging_level=logging.WARNING, log_to_driver=False, configure_logging=True,
                            runtime_env={"env_vars": worker_env(), "worker_process_setup_hook": SETUP_HOOK})
        if address:
            ray.init(address=address, **kwargs)
        else:
            # The dashboard starts where ray[default] is installed: Train V2 frees the placement groups of stopped
            # trials through the State API, which needs it.
            dash = os.environ.get("ORCHESTRATOR_RAY_DASHBOARD")  # "0" starts without it (to test that path)
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=None if dash is None else dash == "1",
                     **kwargs)
    # Tune logs every failed trial's full traceback at ERROR; cv prints the root cause and keeps the traceback on disk.
    logging.getLogger("ray.tune.execution.tune_controller").setLevel(logging.CRITICAL)
    logging.getLogger("ray.tune.tune").setLevel(logging.CRITICAL)
    return ray.cluster_resources()


def shutdown_ray() -> None:
    """Disconnect from Ray; a local cluster this process started stops with it (its workers too), a joined one is
    left running."""
    ray.shutdown()


def link_ray_logs(run_dir: Path) -> Path | None:
    """``<run_dir>/logs/ray`` -> this Ray session's log folder on this node (every local worker's stdout/stderr), so
    the full logs of a run are reachable from its run directory while the console stays quiet."""
    context = ray.get_runtime_context()
    logs = Path(context.get_temp_dir()) / context.get_session_name() / "logs"
    if not logs.is_dir():  # e.g. a driver outside the cluster it joined: the logs live on the nodes
        return None
    link = run_dir / "logs" / "ray"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(logs, target_is_directory=True)
    return link


def build_trainer(cfg: Config, fold: int, run_dir: str | Path, placement: Placement | None = None,
                  callbacks: list | None = None, cache_root: str | Path | None = None) -> TorchTrainer:
    """Fold ``fold``'s Ray Train run, placed as ``placement`` (default: as ``cluster.*`` asks, the whole fold).
    ``run_dir``: a local path or a URI (``RunDir.location``). ``cache_root``: the folder whose ``compile_cache`` the
    fold compiles into (default ``run_dir``; a sweep passes its own folder so every trial shares one)."""
    placement = placement or base_placement(cfg)
    storage_path, storage_fs = storage.ray_storage(run_dir, "ray")
    scaling = ray.train.ScalingConfig(
        num_workers=placement.workers,
        use_gpu=placement.use_gpu,
        resources_per_worker={"CPU": placement.cpus_per_worker, **({"GPU": 1} if placement.use_gpu else {})},
    )
    return TorchTrainer(
        fold_worker,
        train_loop_config={"cfg": cfg.to_dict(), "fold": fold, "run_dir": str(run_dir), "placement": placement,
                           "compile_cache": None if cfg.model.compile == "off" else compile_cache_dir(
                               cfg, cache_root or run_dir)},  # nothing compiles: no folder
        scaling_config=scaling,
        run_config=ray.train.RunConfig(
            name=f"fold={fold}",  # stable: a rerun finds this fold's checkpoints
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=fold_failure_config(cfg),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=callbacks or [],
        ),
    )


def fold_failure_config(cfg: Config) -> ray.train.FailureConfig:
    """Worker deaths: ``cluster.max_failures`` restarts. Worker-group starts that fail or time out waiting for the
    fold's resources count as controller failures, which Ray 2.60 retries without limit by default (a fold that can
    never start kept a run silent for 37 minutes): ``cluster.start_attempts`` bounds them, through FailureConfig's
    ``controller_failure_limit`` (retries after the first try)."""
    attempts = cfg.cluster.start_attempts
    return ray.train.FailureConfig(max_failures=cfg.cluster.max_failures,
                                   controller_failure_limit=-1 if attempts is None else attempts - 1)


def fold_trial(config: dict, cfg: dict, run_dir: str, phase: Phase) -> None:
    """One Tune trial = one fold's Ray Train run; ``config`` holds the fold, ``phase`` its placement."""
    from ray.tune.integration.ray_train import TuneReportCallback

    fold = config["fold"]
    trainer = build_trainer(config_from_dict(cfg), fold, run_dir, phase[fold], callbacks=[TuneReportCallback()])
    trainer.fit()  # raises TrainingFailedError after cluster.max_failures restarts; Tune marks the trial errored


def state_api_available() -> bool:
    """Whether Ray's State API answers (it needs the dashboard, from ray[default])."""
    try:
        from ray.util.state import list_nodes

        # This cluster's address, not Ray's guess (with two clusters on the machine the guess raises), and an answer
        # about this cluster's nodes: another cluster's dashboard on the machine once answered for one without any.
        nodes = list_nodes(address=ray.get_runtime_context().gcs_address, limit=100, timeout=10,
                           raise_on_missing_output=False)
        ours = {n["NodeID"] for n in ray.nodes()}
        return bool(nodes) and all(n.node_id in ours for n in nodes)
    except Exception:  # noqa: BLE001 - any failure means Train cannot use it either
        return False


def remove_leftover_placement_groups() -> int:
    """Remove every live placement group of this (private, local) cluster; returns how many."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    n = 0
    for pg_hex, info in ray.util.placement_group_table().items():
        if info.get("state") in ("CREATED", "PENDING", "RESCHEDULING"):
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex))))
            except Exception as e:  # noqa: BLE001 - Train's own cleanup may have removed it meanwhile
                log.debug("placement group %s: %s", pg_hex, e)
                continue
            n += 1
    return n


def run_folds(cfg: Config, phase: Phase, run: RunDir, concurrency: int,
              later_fold_times: float = 0.0) -> dict[int, str | None]:
    """Train the folds of ``phase``, each placed as it says, as concurrent Tune trials; returns {fold: None if it
    finished (or paused at its placement's ``stop_at``, a piece of a rotated schedule), else the error text}.
    ``later_fold_times``: whole-fold durations of the phases after this one, for the console's run ETA.

    Without the State API (no dashboard), Ray 2.60's Train V2 leaves each finished run's worker placement group
    reserved, and later folds wait for resources forever. Then, on a cluster this process started, folds run in waves
    of ``concurrency`` and leftover placement groups are removed between waves. With the State API Train frees them
    itself, but not always: on a loaded machine two finished folds' groups outlived their Tuner and the next phase
    waited for their CPUs forever (seen 2026-11-29). So on a cluster this process started, whatever a phase leaves
    reserved is removed once its Tuner returns (every trial of it has ended by then)."""
    folds = list(phase)
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
                if interrupt.requested():
                    break
                wave = {k: phase[k] for k in folds[i:i + concurrency]}
                out.update(_tune_folds(cfg, wave, run, concurrency, later_fold_times))
                remove_leftover_placement_groups()
            return out
    out = _tune_folds(cfg, phase, run, concurrency, later_fold_times)
    if not cfg.cluster.address:
        freed = remove_leftover_placement_groups()
        if freed:
            log.warning("freed %d placement group(s) that finished folds had left reserved", freed)
    return out


def _tune_folds(cfg: Config, phase: Phase, run: RunDir, concurrency: int,
                later_fold_times: float) -> dict[int, str | None]:
    if interrupt.requested():  # Ctrl-C came between two Tuners: start no other
        return {}
    storage.remove_tree(run.location, "ray/folds")  # Tune's own bookkeeping; Train checkpoints live beside it
    storage_path, storage_fs = storage.ray_storage(run.location, "ray")
    trial = ray.tune.with_parameters(fold_trial, cfg=cfg.to_dict(), run_dir=run.location, phase=phase)
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(trial, TRIAL_RESOURCES),
        param_space={"fold": ray.tune.grid_search(list(phase))},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrency),
        run_config=ray.tune.RunConfig(name="folds", storage_path=storage_path, storage_filesystem=storage_fs, verbose=0,
                                      callbacks=[Progress(len(phase), concurrency,
                                                         later_fold_times=later_fold_times,
                                                         compiled=cfg.model.compile != "off"),
                                                 *tracking.callbacks(run.local)],  # MLflow / W&B, from the driver
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
        log_path = run.local / "logs" / f"fold={fold}.error.txt"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(full)
        out[fold] = f"{root_cause(full)} (full traceback: {run.show(f'logs/fold={fold}.error.txt')})"
    return out
