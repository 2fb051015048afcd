"""Where a CV run's wall time went, per fold and per run of a fold, read back from files the run already writes.

Every run of a fold (a whole fold, or one piece of a rotated one) logs ``elapsed_s`` (seconds since its training loop
started) to TensorBoard at each logged step, and every event carries its wall-clock time; the fold's final
``metrics.json`` is written last. From those:

- **start**: from the previous boundary (the command's start, or the end of the last run that finished before this one
  started) to the training loop's start: Ray Tune's trial, the Ray Train worker group, imports and the model load;
- **compile**: the first logged window's time beyond what the same steps take at the steady pace (compilation and
  other first-step costs); with ``model.precompile`` the first report comes at the run's start step, once every
  training graph is compiled, so this is the time those passes took;
- **train**: the rest of the training loop;
- **steady at**: seconds from the training loop's start to the first logged step after which nothing was compiled
  again (the ``compiles`` count the fold reports stays put): the wait before the fold runs at its steady pace and the
  console's ETA can be trusted (None when the fold did not count its recompilations);
- **after**: for a fold's last run, from its last training step to ``metrics.json``: prediction of the held-out rows
  and writing the fold's files (for a paused piece, its checkpoint is in the next run's start).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunLog:
    """One run of a fold: (wall time, step, elapsed seconds) at each logged step, and the run's end if known."""
    fold: int
    logs: list[tuple[float, int, float]]
    end: float | None = None  # wall time the fold's metrics.json was written (its last run only)
    compiles: dict[int, float] | None = None  # step -> recompilations so far, when the fold counted them


def read_run_logs(run_dir: Path) -> list[RunLog]:
    """Every run of every fold under ``run_dir/tensorboard/fold=<k>`` (one events file per run), in time order."""
    from orchestrator.reporting.events import scalars_of

    runs = []
    for fold_dir in sorted((run_dir / "tensorboard").glob("fold=*")):
        fold = int(fold_dir.name.split("=")[1])
        for events in sorted(fold_dir.glob("events.out.tfevents.*")):
            found = scalars_of(events, ("elapsed_s", "compiles"))
            points, counts = found["elapsed_s"], found["compiles"]
            if points is None:
                continue
            logs = [(e.wall_time, e.step, e.value) for e in points]
            runs.append(RunLog(fold, sorted(logs), compiles=None if counts is None else {
                e.step: e.value for e in counts}))
    for fold in {r.fold for r in runs}:
        metrics = run_dir / f"fold={fold}" / "metrics.json"
        last = max((r for r in runs if r.fold == fold), key=lambda r: r.logs[-1][0])
        if metrics.exists():
            last.end = metrics.stat().st_mtime
    return sorted(runs, key=lambda r: r.logs[0][0] - r.logs[0][2])


def breakdown(runs: list[RunLog], t0: float) -> list[dict]:
    """Seconds of start, compile, train and after for each run (see the module doc); ``t0``: the command's start."""
    out = []
    ends: list[float] = []
    for r in runs:
        (w1, s1, e1), (wn, sn, en) = r.logs[0], r.logs[-1]
        train_start = w1 - e1
        boundary = max([t for t in ends if t <= train_start + 1.0], default=t0)
        # steps of the first window: from the run's first step; a resumed piece starts at its checkpoint's step
        steady = (en - e1) / (sn - s1) if sn > s1 else None
        first_steps = s1 - _start_step(runs, r)
        compile_s = max(0.0, e1 - first_steps * steady) if steady is not None else None
        row = {"fold": r.fold, "start_s": train_start - boundary, "compile_s": compile_s,
               "train_s": en - (compile_s or 0.0), "after_s": (r.end - wn) if r.end is not None else None,
               "s_per_step": steady, "steps": sn - _start_step(runs, r), "steady_at_s": steady_at(r)}
        ends.append(r.end if r.end is not None else wn)
        out.append(row)
    return out


def steady_at(r: RunLog) -> float | None:
    """Elapsed seconds at the first logged step from which the run's recompilation count no longer grows; None
    without a count at every logged step."""
    if r.compiles is None or any(step not in r.compiles for _, step, _ in r.logs):
        return None
    final = r.compiles[r.logs[-1][1]]
    return next(elapsed for _, step, elapsed in r.logs if r.compiles[step] == final)


def _start_step(runs: list[RunLog], r: RunLog) -> int:
    """The step this run started at: the last step logged by an earlier run of the same fold (0 for its first)."""
    earlier = [x.logs[-1][1] for x in runs if x.fold == r.fold and x.logs[-1][0] < r.logs[0][0]]
    return max(earlier, default=0)


def mean_overheads(rows: list[dict]) -> dict:
    """Mean start, compile and after seconds over runs (after: over the folds' last runs only)."""
    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    return {k: mean(k) for k in ("start_s", "compile_s", "steady_at_s", "after_s", "train_s")}


def format_breakdown(rows: list[dict]) -> str:
    def f(v):
        return "-" if v is None else f"{v:.1f}"

    lines = [f"{'fold':>4} {'start s':>8} {'compile s':>9} {'steady at s':>11} {'train s':>8} {'after s':>8} "
             f"{'steps':>6} {'s/step':>7}"]
    for r in rows:
        pace = "-" if r["s_per_step"] is None else f"{r['s_per_step']:.3f}"
        lines.append(f"{r['fold']:>4} {f(r['start_s']):>8} {f(r['compile_s']):>9} {f(r.get('steady_at_s')):>11} "
                     f"{f(r['train_s']):>8} {f(r['after_s']):>8} {r['steps']:>6} {pace:>7}")
    return "\n".join(lines)
