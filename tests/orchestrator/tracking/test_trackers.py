"""The trackers, fed fold reports as the folds' Tuner hands them over (no Ray here; the real path runs in
tests/orchestrator/test_cv_e2e.py and test_tune.py, whose runs track themselves), and read back with each tracker's
own client: MLflow's ``MlflowClient`` on a sqlite store, W&B's offline transaction log
(tests/orchestrator/tracking/wandb_log.py). A tracker that cannot be reached or imported costs one warning line and
nothing else."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from orchestrator import tracking
from orchestrator.tracking.callback import TrackingCallback
from tests.orchestrator.synthetic_runs import bundled_rows, make_run, noisy_probs
from tests.orchestrator.tracking.wandb_log import read_runs
from trainer_core.config import load_config

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("wandb")


def fold_reports(fold: int, steps: int = 3) -> list[dict]:
    """What rank 0 of a fold reports (trainer_core.fold.loop): per-step figures, then the final metrics."""
    out = [{"fold": fold, "step": s, "total_steps": steps, "train_loss": 1.0 / s + fold, "lr": 1e-4 * s,
            "samples_per_s": 10.0 + s, "grad_norm": 0.5} for s in range(1, steps + 1)]
    out.append({"fold": fold, "log_loss": 0.9 + fold / 100, "accuracy": 0.5, "steps": steps, "train_seconds": 3.0,
                "done": True})
    return out


@pytest.fixture
def run_dir(tmp_path):
    rows = bundled_rows(60, n_folds=2)
    return make_run(tmp_path / "run", rows, noisy_probs(rows["label"].to_numpy(), 1.0, seed=0), name="tracked")


def feed(run_dir, folds):
    cb = TrackingCallback(str(run_dir))
    for k in folds:
        trial = SimpleNamespace(config={"fold": k}, trial_id=f"t{k}")
        for r in fold_reports(k):
            cb.on_trial_result(0, [], trial, r)


def test_mlflow_and_wandb_offline_get_parent_children_steps_metrics_and_artifacts(run_dir, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, ["experiment=tracked", f"tracking.mlflow={uri}", "tracking.wandb=offline",
                             "train.lr=3e-4"])
    assert tracking.start(cfg, run_dir, folds=[0, 1]) is not None
    feed(run_dir, [0, 1])
    report = json.loads((run_dir / "report.json").read_text())
    tracking.finish_cv(run_dir, report)
    assert "warning" not in capsys.readouterr().err

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("tracked")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"fold=0", "fold=1"} and len(runs) == 3
    assert parent.data.params["train.lr"] == "0.0003" and parent.data.params["folds"] == "0,1"
    assert parent.data.metrics["cv_log_loss"] == pytest.approx(report["cv_log_loss"])
    assert parent.data.metrics["fold_1_log_loss"] == pytest.approx(report["folds"][1]["log_loss"])
    lo, hi = report["cv_log_loss_ci95"]
    assert parent.data.metrics["cv_log_loss_ci95_low"] == pytest.approx(lo)
    assert parent.data.metrics["cv_log_loss_ci95_high"] == pytest.approx(hi)
    assert parent.data.metrics["length_baseline_log_loss"] == pytest.approx(report["length_baseline_log_loss"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"report.html", "report.json",
                                                                         "oof.parquet"}
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children.values())
    loss = client.get_metric_history(children["fold=1"].info.run_id, "train_loss")
    assert [(m.step, m.value) for m in loss] == [(1, 2.0), (2, 1.5), (3, pytest.approx(1 + 1 / 3))]
    assert [m.step for m in client.get_metric_history(children["fold=0"].info.run_id, "samples_per_s")] == [1, 2, 3]
    assert children["fold=1"].data.metrics["log_loss"] == pytest.approx(0.91)

    wb = {r["name"]: r for r in read_runs(run_dir / "wandb")}
    assert set(wb) == {"run", "run/fold=0", "run/fold=1"}
    assert {r["group"] for r in wb.values()} == {"run"}
    assert wb["run"]["config"]["train"]["lr"] == 3e-4 and wb["run/fold=0"]["config"]["fold"] == 0
    assert [h["train_loss"] for h in wb["run/fold=0"]["history"]] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert [h["_step"] for h in wb["run/fold=0"]["history"]] == [1, 2, 3]
    assert wb["run/fold=1"]["summary"]["log_loss"] == pytest.approx(0.91)
    assert wb["run"]["summary"]["cv_log_loss"] == pytest.approx(report["cv_log_loss"])
    assert sorted(wb["run"]["artifact_files"]) == ["oof.parquet", "report.html", "report.json"]
    assert all(r["exit_code"] == 0 for r in wb.values())


def test_a_rerun_logs_into_the_same_parent_run(run_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, ["experiment=tracked", f"tracking.mlflow={uri}"])
    tracking.start(cfg, run_dir, folds=[0, 1])
    feed(run_dir, [0])
    tracking._ACTIVE[str(run_dir.resolve())]._abandon()  # the command died: runs closed as killed/failed
    tracking._ACTIVE.clear()
    tracking.start(cfg, run_dir, folds=[0, 1])  # the same command again: resumes
    feed(run_dir, [1])
    tracking.finish_cv(run_dir, json.loads((run_dir / "report.json").read_text()))
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId")) == ["fold=0", "fold=1"]


def test_unreachable_mlflow_is_one_warning_line_and_the_run_goes_on(run_dir, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = load_config(None, ["tracking.mlflow=http://127.0.0.1:9"])  # nothing listens on the discard port
    tracker = tracking.start(cfg, run_dir, folds=[0])
    feed(run_dir, [0])
    tracking.finish_cv(run_dir, json.loads((run_dir / "report.json").read_text()))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: tracking: mlflow unavailable") and tracker.backends == []


def test_missing_packages_are_one_warning_line_each(run_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError, as when it is not installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = load_config(None, ["tracking.mlflow=sqlite:///x.db", "tracking.wandb=offline"])
    tracker = tracking.start(cfg, run_dir, folds=[0])
    feed(run_dir, [0])
    tracking.finish_cv(run_dir, json.loads((run_dir / "report.json").read_text()))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: tracking: tracking.mlflow=sqlite:///x.db is set but mlflow is not installed (pip install "
                   "'.[tracking]'); the run goes on without mlflow",
                   "warning: tracking: tracking.wandb=offline is set but wandb is not installed (pip install "
                   "'.[tracking]'); the run goes on without wandb"]
    assert tracker.backends == [] and not (run_dir / "wandb").exists()


def test_a_tracker_failing_mid_run_is_dropped_with_one_line(run_dir, tmp_path, capsys):
    cfg = load_config(None, [f"tracking.mlflow=sqlite:///{tmp_path / 'mlflow.db'}"])
    tracker = tracking.start(cfg, run_dir, folds=[0, 1])

    def broken(*a, **k):
        raise ConnectionError("server went away\nsecond line")
    tracker.backends[0].log = broken
    feed(run_dir, [0, 1])
    tracking.finish_cv(run_dir, json.loads((run_dir / "report.json").read_text()))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: tracking: mlflow failed (ConnectionError: server went away); no more logging to it in "
                   "this run"]


def test_tracking_is_not_part_of_a_runs_identity():
    plain = load_config(None, [])
    tracked = load_config(None, ["tracking.mlflow=http://x:5000", "tracking.wandb=online", "tracking.wandb_project=p"])
    assert plain.fingerprint() == tracked.fingerprint()
    assert plain.fingerprint() != load_config(None, ["train.lr=1e-3"]).fingerprint()  # the check can fail


def test_no_tracker_configured_opens_nothing(run_dir):
    assert tracking.start(load_config(None, []), run_dir) is None
    feed(run_dir, [0])  # the callback finds no tracker and does nothing
    assert not (run_dir / "tracking.json").exists()


def test_every_tracking_key_has_its_help_config_line():
    from trainer_core.config import field_docs

    docs = {k: doc for k, doc, _ in field_docs() if k.startswith("tracking.")}
    assert set(docs) == {"tracking.mlflow", "tracking.mlflow_experiment", "tracking.wandb", "tracking.wandb_project",
                         "tracking.wandb_entity"} and all(docs.values())
