"""One command's trackers: the parent run, a child run per fold (or sweep trial), and what goes into each.

Every call into a tracker goes through :meth:`Tracker._each`: the first failure of a tracker prints one warning line
and turns that tracker off for the rest of the command, so a dead server or a missing package never stops training.
Run ids are kept in ``<run_dir>/tracking.json`` so a resumed command logs into the runs it started."""

from __future__ import annotations

import atexit
import json
import math
import sys
from pathlib import Path

from trainer_core.config import apply_overrides

IDS_FILE = "tracking.json"
# From the fold reports (rank 0's, as Ray Train forwards them): logged at their optimizer step.
STEP_KEYS = ("train_loss", "lr", "samples_per_s", "tokens_per_s", "grad_norm", "interim_log_loss", "interim_accuracy")
# From a fold's final report (its metrics.json): the child run's final figures.
FOLD_KEYS = ("log_loss", "accuracy", "prior_log_loss", "log_loss_tta", "accuracy_tta", "steps", "train_seconds",
             "train_samples_per_s")
# From report.json: the parent run's final figures (plus cv_log_loss_ci95_low/high and fold_<k>_log_loss).
CV_KEYS = ("cv_log_loss", "cv_accuracy", "cv_log_loss_fold_std", "prior_log_loss", "length_baseline_log_loss",
           "cv_log_loss_calibrated", "temperature", "cv_log_loss_tta", "cv_accuracy_tta", "cv_log_loss_tta_calibrated",
           "n_rows")


def warn(text: str) -> None:
    print(f"warning: tracking: {text}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__


def numbers(values: dict, keys) -> dict[str, float]:
    """The finite numbers among ``values[keys]`` (NaN and missing keys left out: trackers refuse or mis-plot them)."""
    out = {}
    for k in keys:
        v = values.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


def flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    """Dotted keys of a config dict, values as text (lists, mappings and null as JSON)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("random_config", "compile_options"):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v)
    return out


def cv_figures(report: dict) -> dict[str, float]:
    """The parent run's final metrics from a report dict."""
    out = numbers(report, CV_KEYS)
    ci = report.get("cv_log_loss_ci95")
    if ci:
        out.update(numbers({"cv_log_loss_ci95_low": ci[0], "cv_log_loss_ci95_high": ci[1]},
                           ("cv_log_loss_ci95_low", "cv_log_loss_ci95_high")))
    for f in report.get("folds", []):
        out.update(numbers({f"fold_{f['fold']}_{k}": f.get(k) for k in ("log_loss", "length_baseline_log_loss")},
                           (f"fold_{f['fold']}_log_loss", f"fold_{f['fold']}_length_baseline_log_loss")))
    return out


class Tracker:
    """The trackers of one run (``kind="cv"``: children per fold) or sweep (``kind="sweep"``: children per trial)."""

    def __init__(self, cfg, run_dir: Path, *, kind: str = "cv", folds: list[int] | None = None):
        self.cfg, self.run_dir, self.kind, self.folds = cfg, Path(run_dir), kind, folds
        self.name = self.run_dir.name
        self.backends: list = []
        self.children: set[str] = set()  # open child runs, by key ("fold=0", "trial=ab12_00001")
        self.finished = False

    # ------------------------------------------------------------------------------------------------ opening
    def _makers(self) -> list:
        t, cfg = self.cfg.tracking, self.cfg
        out = []
        if t.mlflow:
            def mlflow():
                from orchestrator.tracking.mlflow_backend import MlflowBackend

                return MlflowBackend(t.mlflow, t.mlflow_experiment or cfg.experiment)
            out.append(("mlflow", f"tracking.mlflow={t.mlflow}", mlflow))
        if t.wandb != "off":
            def wandb():
                from orchestrator.tracking.wandb_backend import WandbBackend

                return WandbBackend(t.wandb, t.wandb_project or cfg.experiment, t.wandb_entity, self.run_dir,
                                    group=self.name)
            out.append(("wandb", f"tracking.wandb={t.wandb}", wandb))
        return out

    def open(self) -> None:
        """Connect every configured tracker and open (or reopen) the parent run."""
        saved = self._saved()
        params = flat_params(self.cfg.to_dict())
        if self.folds is not None:
            params["folds"] = ",".join(map(str, self.folds))
        for name, setting, make in self._makers():
            try:
                backend = make()
            except ImportError as e:
                warn(f"{setting} is set but {e.name or name} is not installed (pip install '.[tracking]'); "
                     f"the run goes on without {name}")
                continue
            except Exception as e:  # noqa: BLE001 - an unreachable server, bad credentials: one line, go on
                warn(f"{name} unavailable ({_one_line(e)}); the run goes on without it")
                continue
            prev = saved.get(name, {})
            same = prev.get("target") == backend.target
            try:
                backend.open_run(None, self.name, params, self.kind, resume_id=prev.get("parent") if same else None,
                                 config=self.cfg.to_dict())
            except Exception as e:  # noqa: BLE001
                warn(f"{name} unavailable ({_one_line(e)}); the run goes on without it")
                continue
            backend.saved_children = dict(prev.get("children", {})) if same else {}
            self.backends.append(backend)
        self._save()
        if self.backends:
            atexit.register(self._abandon)

    def _saved(self) -> dict:
        try:
            return json.loads((self.run_dir / IDS_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def _save(self) -> None:
        from trainer_core.paths import atomic_write_json

        if not self.backends:
            return
        ids = self._saved()
        for b in self.backends:
            ids[b.name] = {"target": b.target, "parent": b.runs.get(None),
                           "children": {**b.saved_children, **{k: v for k, v in b.runs.items() if k is not None}}}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.run_dir / IDS_FILE, ids)

    def _each(self, fn) -> None:
        """``fn(backend)`` on every live tracker; a tracker that raises is warned about once and dropped."""
        for b in list(self.backends):
            try:
                fn(b)
            except Exception as e:  # noqa: BLE001 - tracking must never end a run
                warn(f"{b.name} failed ({_one_line(e)}); no more logging to it in this run")
                self.backends.remove(b)

    # ------------------------------------------------------------------------------------------------ children
    def _child(self, key: str, params: dict[str, str], config: dict) -> None:
        if key in self.children:
            return
        self.children.add(key)

        def open_child(b):
            if key not in b.runs:
                b.open_run(key, key, params, "fold" if self.kind == "cv" else "trial",
                           resume_id=b.saved_children.get(key), config=config)
        self._each(open_child)
        self._save()

    def fold_result(self, fold: int, result: dict) -> None:
        """A fold report from the folds' Tuner: per-step figures, or (``done``) the fold's final ones."""
        key = f"fold={fold}"
        self._child(key, {"fold": str(fold)}, {**self.cfg.to_dict(), "fold": fold})
        if result.get("done"):
            self.close_child(key, numbers(result, FOLD_KEYS), ok=True)
            return
        step_values = numbers(result, STEP_KEYS)
        if step_values and "step" in result:
            self._each(lambda b: b.log(key, step_values, int(result["step"])))

    def trial_result(self, trial_id: str, overrides: dict, result: dict, time_attr: str) -> None:
        """A sweep trial's report: interim held-out loss at its sweep step, or (``complete``) its OOF figures."""
        key = f"trial={trial_id}"
        params = {k: v if isinstance(v, str) else json.dumps(v) for k, v in overrides.items()}
        self._child(key, params, {**apply_overrides(self.cfg, overrides).to_dict(), "trial_id": trial_id})
        if result.get("complete"):
            final = numbers(result, ("log_loss", "accuracy", *[k for k in result if k.startswith("fold_")]))
            trial_dir = self.run_dir / key
            files = [trial_dir / n for n in ("report.html", "report.json", "oof.parquet") if (trial_dir / n).exists()]
            self.close_child(key, final, ok=True, artifacts=files)
            return
        step_values = numbers(result, STEP_KEYS)
        if step_values and time_attr in result:
            self._each(lambda b: b.log(key, step_values, int(result[time_attr])))

    def close_child(self, key: str, final: dict, *, ok: bool, artifacts: list[Path] = ()) -> None:
        if key not in self.children:
            return
        self.children.discard(key)

        def close(b):
            if key in b.runs:
                if final:
                    b.summary(key, final)
                if artifacts:
                    b.artifacts(key, list(artifacts))
                b.close(key, ok)
        self._each(close)

    # ------------------------------------------------------------------------------------------------ finishing
    def finish(self, report: dict | None, artifacts: list[Path], figures: dict[str, float] | None = None) -> None:
        """The parent's final figures (from ``report``, else ``figures``) and files; every run closed."""
        figures = cv_figures(report) if report else dict(figures or {})
        files = [p for p in artifacts if Path(p).exists()]

        def close(b):
            if figures:
                b.summary(None, figures)
            if files:
                b.artifacts(None, files)
            b.close(None, True)
        for key in list(self.children):
            self.close_child(key, {}, ok=False)
        self._each(close)
        self.finished = True

    def _abandon(self) -> None:
        """At exit without :meth:`finish` (a failed fold, Ctrl-C): close every run as failed or killed."""
        if self.finished:
            return
        for key in list(self.children):
            self.close_child(key, {}, ok=False)
        self._each(lambda b: b.close(None, False))
        self.finished = True
