"""The console while folds train: a line when a fold starts, one per fold report (step/total, loss, throughput, ETA)
and the whole run's ETA. The ETAs come from :mod:`orchestrator.cluster.eta`: "warming up" until a fold's step rate is
steady, never an average over compilation."""

from __future__ import annotations

import sys
import time

import ray.tune

from orchestrator.cluster.errors import trial_root_cause
from orchestrator.cluster.eta import FoldPace, fmt_s, run_eta_s


class Progress(ray.tune.Callback):
    """Console lines for one phase of folds (``n_folds`` of them, ``concurrency`` at a time); ``later_fold_times``:
    whole-fold durations the phases after this one still take (:func:`orchestrator.cluster.eta.later_fold_times`);
    ``compiled``: whether the folds compile their layers (``model.compile`` on or dynamic), which the start line says
    only when it is so."""

    def __init__(self, n_folds: int, concurrency: int, stream=sys.stdout, later_fold_times: float = 0.0, *,
                 compiled: bool):
        self.n_folds, self.concurrency, self.later, self.compiled = n_folds, concurrency, later_fold_times, compiled
        self.finished = 0
        self.stream = stream
        self.t0 = time.time()
        self.state: dict[int, dict] = {}  # fold -> its last result
        self.pace: dict[int, FoldPace] = {}
        self.last_print = 0.0

    def on_trial_start(self, iteration, trials, trial, **info):
        first = "then its layers compile, so " if self.compiled else ""
        self._line(f"fold {trial.config.get('fold')}: started (loading the model; {first}the ETA shows once the step "
                   f"rate is steady)")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        fold = trial.config.get("fold")
        if result.get("paused"):  # a piece of a rotated schedule ended; the fold continues in a later phase
            self._forget(fold)
            self._line(f"fold {fold}: paused at step {result['step']}/{result['total_steps']} (checkpointed; "
                       f"continues in a later phase)")
            return
        if result.get("done"):
            self._forget(fold)
            self.finished += 1
            self._line(f"fold {fold}: done  log_loss {result['log_loss']:.4f}  accuracy {result['accuracy']:.4f}  "
                       f"({result['train_seconds']:.0f}s training)")
            return
        if "step" not in result:
            return
        self.state[fold] = result
        pace = self.pace.setdefault(fold, FoldPace(result["total_steps"]))
        if "precompile_done" in result:  # trainer_core.fold.precompile, one batch length done of several: no pace yet
            done, of = result["precompile_done"], result["precompile_total"]
            self._line(f"fold {fold}: compiling its training graphs: {done} of {of} batch lengths in "
                       f"{fmt_s(result.get('elapsed_s'))}")
            return
        pace.add(result.get("elapsed_s", 0.0), result["step"], result.get("compiles", 0), result.get("start_step"))
        if "precompiled_lengths" in result:  # trainer_core.fold.precompile: the training graphs, before step 1
            n, helpers, failed = result["precompiled_lengths"], result.get("compile_helpers"), \
                result.get("compile_helpers_failed")
            by = (f" ({helpers} compile helper{'s' * (helpers != 1)} compiled them while the model loaded"
                  f"{f', {failed} failed' if failed else ''})" if helpers else "")
            self._line(f"fold {fold}: compiled its training graphs for {n} batch length{'s' * (n != 1)} in "
                       f"{fmt_s(result.get('elapsed_s'))}{by}; training from step "
                       f"{result['step']}/{result['total_steps']}")
            return
        if time.time() - self.last_print < 2 and result["step"] != result["total_steps"]:
            return
        self.last_print = time.time()
        loss = f"  loss {result['train_loss']:.4f}" if "train_loss" in result else ""
        sps = f"  {result['samples_per_s']:.1f} samples/s" if "samples_per_s" in result else ""
        eta = self.eta(fold)
        when = f"eta {fmt_s(eta)}" if eta is not None else (
            "compiling" if pace.compiling() and result.get("compiles") else "warming up")
        overall = self.overall_eta()
        self._line(f"fold {fold}: step {result['step']}/{result['total_steps']}{loss}{sps}  {when}"
                   f"  (all folds: {fmt_s(overall) if overall is not None else 'after warm-up'})")

    def eta(self, fold: int) -> float | None:
        """Seconds until ``fold`` finishes at its steady pace; None while it warms up."""
        return self.pace[fold].eta_s()

    def overall_eta(self) -> float | None:
        """The running folds, this phase's folds not started yet (Tune creates trials lazily, so they are counted
        from the total), then the phases still to come; None until every running fold is steady."""
        running = list(self.pace.values())
        waiting = max(0, self.n_folds - self.finished - len(running))
        return run_eta_s(running, waiting, self.concurrency, self.later)

    def _forget(self, fold: int) -> None:
        self.state.pop(fold, None)
        self.pace.pop(fold, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        cause = trial_root_cause(trial)  # named now, not only once the phase ends
        self._line(f"fold {trial.config.get('fold')}: FAILED{f': {cause}' if cause else ''} (details in "
                   f"{trial.local_path or 'the Ray logs'})")

    def _line(self, text: str) -> None:
        print(f"[{fmt_s(time.time() - self.t0)}] {text}", file=self.stream, flush=True)
