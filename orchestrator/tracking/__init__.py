"""Experiment tracking (``tracking.mlflow``, ``tracking.wandb``): the runs a practitioner browses in MLflow or W&B.

One parent run per CV (``orchestrator.cv``) or sweep (``orchestrator.tune``) with the resolved config as
parameters; one child run per fold (per trial in a sweep) with its per-step training loss, learning rate and samples/s
and its final scores; the parent gets the CV figures (log loss, its 95% interval, per-fold log losses, baselines) and
report.html, report.json and oof.parquet as artifacts.

Everything is logged from the driver: Ray Train V2 refuses Tune's logger callbacks on its RunConfig, and the folds'
Tuner sees every fold report anyway (rank 0's metrics, forwarded by ``TuneReportCallback``), so the fold loop
(``trainer_core``) knows nothing of trackers. :func:`callbacks` gives the Tune callback that forwards them.

A tracker never stops a run: a missing package, an unreachable server or a failed call prints one warning line and
that tracker is off for the rest of the command. The tracker packages are an optional extra (``pip install
.[tracking]``) imported only when a tracker is configured.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.tracking.tracker import Tracker

_ACTIVE: dict[str, Tracker] = {}  # run (or sweep) directory -> its open tracker, for the Tune callbacks


def _key(run_dir) -> str:
    return str(Path(run_dir).resolve())


def start(cfg, run_dir: Path, *, kind: str = "cv", folds: list[int] | None = None) -> Tracker | None:
    """Open the trackers ``cfg.tracking`` asks for (None when it asks for none) with a parent run for ``run_dir``: a CV
    (``kind="cv"``, children per fold) or a sweep (``kind="sweep"``, children per trial). A rerun of the same directory
    continues the runs it logged before (their ids are kept in ``<run_dir>/tracking.json``)."""
    t = cfg.tracking
    if not t.mlflow and t.wandb == "off":
        return None
    tracker = Tracker(cfg, Path(run_dir), kind=kind, folds=folds)
    tracker.open()
    _ACTIVE[_key(run_dir)] = tracker
    return tracker


def active(run_dir) -> Tracker | None:
    """The tracker :func:`start` opened for ``run_dir`` in this process, if any."""
    return _ACTIVE.get(_key(run_dir))


def callbacks(run_dir) -> list:
    """The Tune callbacks that forward fold (or sweep trial) reports to ``run_dir``'s tracker. Always one callback:
    it holds only the directory and finds the tracker at call time, so Tune can pickle it with the experiment and a
    restored sweep finds the tracker its rerun opened."""
    from orchestrator.tracking.callback import TrackingCallback

    return [TrackingCallback(_key(run_dir))]


def finish(run_dir, report: dict | None = None, artifacts: list[Path] | None = None,
           figures: dict[str, float] | None = None) -> None:
    """Log ``report``'s final figures (or ``figures``) and ``artifacts`` to the parent run and close every run of
    ``run_dir`` (nothing when no tracker is open)."""
    tracker = _ACTIVE.pop(_key(run_dir), None)
    if tracker is not None:
        tracker.finish(report, artifacts or [], figures)


def finish_cv(run_dir, report: dict) -> None:
    """:func:`finish` with a CV run's report and its report.html, report.json and oof.parquet."""
    run_dir = Path(run_dir)
    finish(run_dir, report, [run_dir / name for name in ("report.html", "report.json", "oof.parquet")])
