"""The console while folds train: one line per fold report (step/total, loss, throughput, ETA) and an overall ETA."""

from __future__ import annotations

import collections
import math
import sys
import time

import ray.tune

from orchestrator.cluster.errors import trial_root_cause

ETA_WINDOW = 8  # progress reports per fold that its ETA is measured over


class Progress(ray.tune.Callback):
    """One console line per fold report: step/total, loss, throughput, ETA; and an overall ETA."""

    def __init__(self, n_folds: int, concurrency: int, stream=sys.stdout):
        self.n_folds, self.concurrency = n_folds, concurrency
        self.finished = 0
        self.stream = stream
        self.t0 = time.time()
        self.state: dict[int, dict] = {}
        self.recent: dict[int, collections.deque] = {}  # fold -> last (elapsed_s, step) pairs
        self.pace: dict[int, float] = {}  # fold -> seconds per step, from ``recent``
        self.last_print = 0.0

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
        window = self.recent.setdefault(fold, collections.deque(maxlen=ETA_WINDOW))
        if window and result["step"] <= window[-1][1]:  # the fold restarted from a checkpoint
            window.clear()
        window.append((result.get("elapsed_s", 0.0), result["step"]))
        self.pace[fold] = self._s_per_step(result, window)
        if time.time() - self.last_print < 2 and result["step"] != result["total_steps"]:
            return
        self.last_print = time.time()
        loss = f"  loss {result['train_loss']:.4f}" if "train_loss" in result else ""
        sps = f"  {result['samples_per_s']:.1f} samples/s" if "samples_per_s" in result else ""
        self._line(f"fold {fold}: step {result['step']}/{result['total_steps']}{loss}{sps}"
                   f"  eta {_fmt_s(self.eta(fold))}  (all folds: {_fmt_s(self._overall_eta(trials))})")

    @staticmethod
    def _s_per_step(r: dict, window) -> float:
        """Seconds per step over the last ``ETA_WINDOW`` reports, so one-off start-up costs (compilation, the first
        batches) stop inflating the ETA once the window has moved past them; before that, the fold's average."""
        if len(window) >= 2 and window[-1][1] > window[0][1]:
            return (window[-1][0] - window[0][0]) / (window[-1][1] - window[0][1])
        done = r["step"] - r.get("start_step", 0)
        return r.get("elapsed_s", 0) / done if done > 0 else math.inf

    def eta(self, fold: int) -> float:
        """Seconds until ``fold`` finishes at its recent pace."""
        r = self.state[fold]
        return self.pace[fold] * (r["total_steps"] - r["step"])

    def _forget(self, fold: int) -> None:
        for d in (self.state, self.recent, self.pace):
            d.pop(fold, None)

    def _overall_eta(self, trials) -> float:
        """Longest running fold plus the not-yet-started folds in waves of ``concurrency`` (Tune creates trials lazily,
        so they are counted from the total, not from ``trials``)."""
        running = [self.eta(f) for f in self.state]
        not_started = max(0, self.n_folds - self.finished - len(running))
        per_fold = [self.pace[f] * r["total_steps"] for f, r in self.state.items() if math.isfinite(self.pace[f])]
        mean = sum(per_fold) / len(per_fold) if per_fold else 0.0
        return max(running, default=0.0) + math.ceil(not_started / self.concurrency) * mean

    def on_trial_error(self, iteration, trials, trial, **info):
        cause = trial_root_cause(trial)  # named now, not only once the phase ends
        self._line(f"fold {trial.config.get('fold')}: FAILED{f': {cause}' if cause else ''} (details in "
                   f"{trial.local_path or 'the Ray logs'})")

    def _line(self, text: str) -> None:
        print(f"[{_fmt_s(time.time() - self.t0)}] {text}", file=self.stream, flush=True)


def _fmt_s(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
