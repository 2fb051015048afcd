"""How long folds still take, without guessing: no number while a fold warms up, the steady step rate once there is
one, and for the whole run the waves and phases still to come.

A compiled fold's first steps are not its pace: loading, compiling and the first recompilations made steps 10-60 of a
9B fold take ~1 s each against ~0.26 s later (H100, docs/PERFORMANCE.md), and an average over them said "1h19m" for a
ten-minute fold. So a fold's rate counts as steady only when its last two report intervals agree and nothing was
compiled during them (the fold reports its compilation count as ``compiles`` when it knows it). Pure functions and
plain data: the console (:mod:`orchestrator.cluster.progress`) feeds them Ray Tune results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

STEADY_TOLERANCE = 0.25  # two successive intervals whose seconds per step differ by less than this share agree
WINDOW = 8  # report intervals a steady rate is measured over, at most


@dataclass
class FoldPace:
    """One fold's progress reports since it (re)started: elapsed seconds, step and compilations so far."""

    total_steps: int
    start_step: int = 0
    points: list[tuple[float, int, int]] = field(default_factory=list)  # (elapsed_s, step, compiles)
    # Seconds per step: the steady rate as of the last report, or the last one measured, kept through a later stall (a
    # batch length first seen late compiles its graph; the console said "warming up" at step 390 of 404 on an H100
    # without it), until the fold restarts. Measured once per report, in add().
    steady: float | None = None

    def add(self, elapsed_s: float, step: int, compiles: int = 0, start_step: int | None = None) -> None:
        if self.points and step <= self.points[-1][1]:  # restarted from a checkpoint: its own clock starts again
            self.points.clear()
            self.steady = None
        if not self.points and start_step is not None:
            self.start_step = start_step
        self.points.append((float(elapsed_s), int(step), int(compiles)))
        rate = self._trailing_steady_rate()
        if rate is not None:
            self.steady = rate

    @property
    def step(self) -> int:
        return self.points[-1][1] if self.points else self.start_step

    def compiling(self) -> bool:
        """Whether the last interval compiled something (or no interval exists yet)."""
        return len(self.points) < 2 or self.points[-1][2] > self.points[-2][2]

    def steady_s_per_step(self) -> float | None:
        """Seconds per step at the steady rate (:attr:`steady`); None while the fold is still warming up (no steady
        rate yet since it started)."""
        return self.steady

    def _trailing_steady_rate(self) -> float | None:
        """Seconds per step over the trailing report intervals that agree with the last one and compiled nothing;
        None unless there are two such intervals."""
        intervals = []  # (s per step, index of the interval's first point), oldest first
        for i in range(len(self.points) - 1):
            (t0, s0, c0), (t1, s1, c1) = self.points[i], self.points[i + 1]
            if s1 > s0:
                intervals.append(((t1 - t0) / (s1 - s0), i, c1 > c0))
        steady: list[tuple[float, int, bool]] = []
        for pace, i, compiled in reversed(intervals):
            if compiled or len(steady) == WINDOW:
                break
            if steady and abs(pace - steady[0][0]) > STEADY_TOLERANCE * max(pace, steady[0][0]):
                break
            steady.append((pace, i, compiled))
        if len(steady) < 2:
            return None
        t0, s0, _ = self.points[steady[-1][1]]
        t1, s1, _ = self.points[-1]
        return (t1 - t0) / (s1 - s0)

    def eta_s(self) -> float | None:
        """Seconds until the fold's last step at its steady rate; None while warming up."""
        pace = self.steady_s_per_step()
        return None if pace is None else pace * (self.total_steps - self.step)

    def fold_s(self) -> float | None:
        """A whole fold's training time at this fold's measured cost: its warm-up (the time spent before the steady
        rate, beyond that rate) plus every step at the steady rate. None while warming up."""
        pace = self.steady_s_per_step()
        if pace is None:
            return None
        t, s, _ = self.points[-1]
        warm_up = max(0.0, t - pace * (s - self.start_step))
        return warm_up + pace * (self.total_steps - self.start_step)


def run_eta_s(running: list[FoldPace], waiting_in_phase: int, concurrency: int,
              later_fold_times: float) -> float | None:
    """Seconds until the run's last fold finishes: the longest running fold, then the folds of this phase not started
    yet in waves of ``concurrency``, then ``later_fold_times`` whole-fold durations for the phases still to come (see
    :func:`later_fold_times`). None until every running fold has a steady rate."""
    etas = [p.eta_s() for p in running]
    fold_times = [p.fold_s() for p in running]
    if not running or any(e is None for e in etas):
        return None
    per_fold = sum(fold_times) / len(fold_times)
    return max(etas) + math.ceil(waiting_in_phase / max(concurrency, 1)) * per_fold + later_fold_times * per_fold


def later_fold_times(phases: list[list[float]], concurrencies: list[int]) -> float:
    """Whole-fold durations that phases still to come take back to back: each phase is a list of the shares of a
    fold each of its folds trains (1.0 = a whole fold; a rotated schedule's pieces are less), run in waves of its
    concurrency; a wave lasts as long as its longest piece."""
    total = 0.0
    for shares, conc in zip(phases, concurrencies):
        conc = max(conc, 1)
        for i in range(0, len(shares), conc):
            total += max(shares[i:i + conc])
    return total


def fmt_s(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
