"""The Tune callback that forwards the reports a Tuner sees (each fold's, or each sweep trial's) to the tracker of
its run directory. It holds only that directory's path: Tune pickles callbacks with its experiment state, and a
restored sweep gets back this callback, which then finds the tracker its rerun opened (or none: it does nothing)."""

from __future__ import annotations

import ray.tune

SWEEP_TIME_ATTR = "sweep_step"  # orchestrator.cluster.sweep_trials.TIME_ATTR: a trial's optimizer steps so far


class TrackingCallback(ray.tune.Callback):
    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def _tracker(self):
        from orchestrator.tracking import active

        return active(self.run_dir)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tracker = self._tracker()
        if tracker is None:
            return
        if tracker.kind == "cv":
            tracker.fold_result(trial.config["fold"], result)
        else:
            tracker.trial_result(trial.trial_id, dict(trial.config), result, SWEEP_TIME_ATTR)

    def on_trial_complete(self, iteration, trials, trial, **info):
        # A sweep trial that ends without its final report was stopped by the scheduler (ASHA): a normal ending.
        tracker = self._tracker()
        if tracker is not None and tracker.kind == "sweep":
            tracker.close_child(f"trial={trial.trial_id}", {"stopped_early": 1.0}, ok=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        tracker = self._tracker()
        if tracker is not None:
            key = f"fold={trial.config.get('fold')}" if tracker.kind == "cv" else f"trial={trial.trial_id}"
            tracker.close_child(key, {}, ok=False)
