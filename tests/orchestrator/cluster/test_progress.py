"""The console's per-fold ETA follows the recent step rate, so a slow start (compilation, the first batches) stops
inflating it, and a fold restarted from a checkpoint starts its window afresh."""

import io
import math
from types import SimpleNamespace

from orchestrator.cluster.progress import ETA_WINDOW, Progress


def feed(progress: Progress, fold: int, elapsed: float, step: int, total: int = 1000, start: int = 0) -> dict:
    result = {"step": step, "total_steps": total, "elapsed_s": elapsed, "start_step": start}
    progress.on_trial_result(0, [], SimpleNamespace(config={"fold": fold}), result)
    return progress.state[fold]


def test_eta_uses_the_recent_rate_after_a_slow_start():
    p = Progress(n_folds=1, concurrency=1, stream=io.StringIO())
    r = feed(p, 0, elapsed=60.0, step=1)  # the first step took a minute (compiling)
    assert math.isclose(p.eta(0), 60.0 * 999)  # nothing better known yet
    for i in range(1, ETA_WINDOW + 1):
        r = feed(p, 0, elapsed=60.0 + 0.25 * 10 * i, step=1 + 10 * i)  # then 0.25 s a step
    assert math.isclose(p.eta(0), 0.25 * (1000 - r["step"]))
    assert math.isclose(p._overall_eta([]), 0.25 * (1000 - r["step"]))


def test_a_restarted_fold_starts_a_new_window():
    p = Progress(n_folds=1, concurrency=1, stream=io.StringIO())
    for i in range(1, 5):
        feed(p, 0, elapsed=1.0 * i, step=10 * i)  # 0.1 s a step
    feed(p, 0, elapsed=30.0, step=25, start=20)  # restarted from step 20, 30 s spent loading
    assert math.isclose(p.eta(0), 30.0 / 5 * (1000 - 25))  # its own average, not a rate across the restart
