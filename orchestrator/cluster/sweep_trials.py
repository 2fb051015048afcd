"""Sweeps on Ray: one Ray Tune trial per point of the search space. A trial applies its dotted overrides to the base
config and runs the requested folds, one after another, through exactly the fold path of ``orchestrator.cv``
(``ray_folds.build_trainer`` -> a Ray Train ``TorchTrainer`` -> ``trainer_core.fold.loop.train_fold``), then the
reducer.

Layout: ``<sweep>/trial=<trial id>/`` is an ordinary run directory (``data.parquet``, ``run.json``, ``fold=<k>/``,
``oof.parquet``, ``report.json``); its Train runs are ``<sweep>/trial=<id>/ray/fold=<k>``, unique per (trial, fold),
so a restarted trial resumes its own checkpoints. Tune's own state is ``<sweep>/ray/tune``. A sweep directory at a
URI keeps all of this there: each trial works on a staging copy of its trial directory (orchestrator.runs.staging),
its folds upload their own files, and Ray keeps checkpoints and state at the URI.

What Tune sees (metric ``loss``, minimised): the interim held-out log loss of each ``train.eval_every`` evaluation of
a fold, at ``sweep_step`` = optimizer steps of the trial so far (over its folds) - ASHA's clock; and, last, the trial's
combined OOF log loss from the reducer. Fold reports without an evaluation stay out of Tune, so every result carries
the metric (Tune checks that strictly) and none of them is stale.
"""

from __future__ import annotations

import io
import json
import math
import sys
import time

import pandas as pd
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator import tracking
from orchestrator.cluster import folds as ray_folds
from orchestrator.cluster.folds import TRIAL_RESOURCES, build_trainer
from orchestrator.runs import storage
from orchestrator.runs.staging import RunDir, open_run
from trainer_core.config import apply_overrides, config_from_dict

METRIC = "loss"
TIME_ATTR = "sweep_step"
DIVERGED = 1e3  # stands in for a NaN/inf interim loss: ASHA ignores NaN rewards, so a diverged trial would live on


class SweepReportCallback(TuneReportCallback):
    """Forwards only fold reports that carry an evaluation, as ``loss`` at ``sweep_step``.

    A fold's own final report is kept out too: it says ``done``, which would end a multi-fold trial in Tune, and the
    trial's real final result (the reducer's OOF log loss) follows from the trial function."""

    def __init__(self, step_offset: int):
        super().__init__()
        self.step_offset = step_offset

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0]
        if "interim_log_loss" not in m or m.get("done"):
            return
        loss = m["interim_log_loss"]
        out = {**m, METRIC: loss if math.isfinite(loss) else DIVERGED, TIME_ATTR: self.step_offset + m["step"]}
        super().after_report(run_context, [out], checkpoint)


def sweep_trial(config: dict, base: dict, sweep_dir: str, folds: list[int], data_sha256: str) -> None:
    """One Tune trial: ``config`` is the trial's dotted overrides; folds run sequentially, finished ones are skipped.
    ``sweep_dir``: the sweep directory's location, a local path or a URI."""
    trial_id = ray.tune.get_context().get_trial_id()
    with open_run(storage.join(sweep_dir, f"trial={trial_id}"), check=False) as trial:
        report = _run_trial(config, base, sweep_dir, trial, trial_id, folds, data_sha256)
    ray.tune.report({METRIC: report["cv_log_loss"], TIME_ATTR: report["sweep_steps"], "log_loss": report["cv_log_loss"],
                     "accuracy": report["cv_accuracy"], "complete": True,
                     **{f"fold_{f['fold']}_log_loss": f["log_loss"] for f in report["folds"]}})


def _run_trial(config: dict, base: dict, sweep_dir: str, trial, trial_id: str, folds: list[int],
               data_sha256: str) -> dict:
    from orchestrator.reporting.reducer import fold_is_complete, reduce_run
    from orchestrator.runs.rundir import claim_run_dir, run_meta
    from trainer_core.paths import atomic_write_json

    cfg = apply_overrides(config_from_dict(base), config)
    rows = pd.read_parquet(io.BytesIO(storage.read_bytes(sweep_dir, "data.parquet")))
    overrides = " ".join(f"{k}={v}" for k, v in config.items())
    trial.pull()  # a resumed trial's files
    trial_dir = trial.local
    claim_run_dir(trial_dir, cfg, rows, run_meta(cfg, rows, folds, data_sha256, f"sweep trial {trial_id}: {overrides}"),
                  restart=False)
    atomic_write_json(trial_dir / "trial.json", {"trial_id": trial_id, "overrides": config})
    trial.push()
    steps = 0
    for k in folds:
        if not fold_is_complete(trial_dir, k, rows):
            build_trainer(cfg, k, trial.location, callbacks=[SweepReportCallback(steps)], cache_root=sweep_dir).fit()
            trial.pull()
        steps += json.loads((trial_dir / f"fold={k}" / "metrics.json").read_text())["steps"]
    report = reduce_run(trial_dir, folds, location=trial.location)
    trial.push()
    return {**report, "sweep_steps": steps}


class SweepProgress(ray.tune.Callback):
    """One console line per interim evaluation and per finished, stopped or failed trial."""

    def __init__(self):
        self.t0 = time.time()  # no stream kept: Tune pickles its callbacks with the experiment for Tuner.restore

    def setup(self, **info):
        self.t0 = time.time()  # a resumed sweep counts from its own start

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("complete"):
            self._line(f"trial {trial.trial_id}: done  OOF log loss {result['log_loss']:.4f}  "
                       f"accuracy {result['accuracy']:.4f}")
        elif "interim_log_loss" in result:
            self._line(f"trial {trial.trial_id}: fold {result['fold']} step {result['step']}/{result['total_steps']}  "
                       f"interim log loss {result['interim_log_loss']:.4f} ({result['interim_rows']} rows)")

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not (trial.last_result or {}).get("complete"):
            self._line(f"trial {trial.trial_id}: stopped early by the scheduler")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(f"trial {trial.trial_id}: FAILED (details in {trial.local_path or 'the Ray logs'})")

    def _line(self, text: str) -> None:
        print(f"[{time.time() - self.t0:6.0f}s] {text}", file=sys.stdout, flush=True)


def build_scheduler(name: str, eval_every: int | None, max_t: int):
    """ASHA on the interim loss, rungs in optimizer steps from the first evaluation; or none (FIFO)."""
    if name == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # stop_last_trials=False: max_t comes from the base config; a trial whose searched values give it more steps must
    # not be cut at max_t.
    return ASHAScheduler(time_attr=TIME_ATTR, max_t=max(max_t, eval_every), grace_period=eval_every,
                         reduction_factor=2, stop_last_trials=False)


def build_search(name: str):
    if name == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch()
    return None  # Tune's default BasicVariantGenerator: random sampling plus grid_search


def run_sweep(base: dict, param_space: dict, sweep: RunDir, folds: list[int], data_sha256: str, *,
              num_samples: int, concurrency: int, search: str, scheduler, restore: bool):
    """Run (or resume) the sweep in ``sweep`` (local, or at a URI: Tune's state there too); returns Tune's
    ResultGrid."""
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(sweep_trial, base=base, sweep_dir=sweep.location, folds=folds,
                                 data_sha256=data_sha256),
        TRIAL_RESOURCES)  # on the head node, like cv folds: a lost worker node costs only its Train workers
    storage_path, storage_fs = storage.ray_storage(sweep.location, "ray")
    if restore:
        tuner = ray.tune.Tuner.restore(f"{storage_path}/tune", trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=storage_fs)
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=ray.tune.TuneConfig(metric=METRIC, mode="min", num_samples=num_samples,
                                            max_concurrent_trials=concurrency, search_alg=build_search(search),
                                            scheduler=scheduler),
            run_config=ray.tune.RunConfig(name="tune", storage_path=storage_path, storage_filesystem=storage_fs,
                                          verbose=0, callbacks=[SweepProgress(), *tracking.callbacks(sweep.local)],
                                          failure_config=ray.tune.FailureConfig(max_failures=0)),
        )
    return tuner.fit()


def trial_status(result) -> str:
    """``complete`` (the reducer's report came back), ``stopped`` (ended by the scheduler before that), ``error``, or
    ``unfinished`` (the sweep was interrupted; a rerun resumes it), from Tune's public Result: Tune marks a trial's
    last result ``done`` when the trial ended, by itself or by the scheduler's decision."""
    metrics = result.metrics or {}
    if result.error is not None:
        return "error"
    if metrics.get("complete"):
        return "complete"
    return "stopped" if metrics.get("done") else "unfinished"


def trial_records(results) -> list[dict]:
    """Per trial of Tune's ResultGrid: id, overrides, :func:`trial_status`, last result and root-cause error, for the
    leaderboard."""
    out = []
    for r in results:
        m = r.metrics or {}
        out.append({"trial_id": m["trial_id"], "overrides": dict(r.config or {}), "status": trial_status(r),
                    "metrics": m, "error": ray_folds.root_cause(str(r.error)) if r.error is not None else None})
    return out
