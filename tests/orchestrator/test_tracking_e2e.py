"""The real path of tracking and the report's recipe: ``orchestrator.cv`` on a local Ray cluster (smoke config, two
folds) with MLflow (a sqlite store) and W&B (offline) both on. What the trackers got is read back with their own
clients and checked against the run's own files: the child runs' training-loss steps are the TensorBoard curve the
report draws, and the parent's CV log loss is report.json's. The report carries its recipe, and the console names
report.html."""

import hashlib
import json
import subprocess
import sys

import pytest

from tests.conftest import CONFIGS, DATA, REPO
from tests.orchestrator.tracking.wandb_log import read_runs

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("wandb")


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    out, uri = root / "run", f"sqlite:///{root / 'mlflow.db'}"
    res = subprocess.run([sys.executable, "-m", "orchestrator.cv", "--config", str(CONFIGS / "smoke.yaml"), "--folds",
                          "0,1", "--out", str(out), "data.max_rows=60", "train.lr=1e-3", f"tracking.mlflow={uri}",
                          "tracking.wandb=offline"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return out, uri, res


def test_mlflow_and_wandb_hold_the_runs_folds_steps_and_report(tracked_run):
    out, uri, res = tracked_run
    assert "warning: tracking" not in res.stderr
    report = json.loads((out / "report.json").read_text())
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"fold=0", "fold=1"}
    assert parent.data.params["train.lr"] == "0.001" and parent.data.params["model.tokenizer"] == "bytes"
    assert parent.data.metrics["cv_log_loss"] == pytest.approx(report["cv_log_loss"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"report.html", "report.json",
                                                                          "oof.parquet"}
    for k in (0, 1):
        child = children[f"fold={k}"]
        history = client.get_metric_history(child.info.run_id, "train_loss")
        curve = report["recipe"]["loss_curves"][str(k)]
        assert curve and [(m.step, m.value) for m in history] == [(s, pytest.approx(v)) for s, v in curve]
        assert client.get_metric_history(child.info.run_id, "lr") and child.data.metrics["samples_per_s"] > 0
        assert child.data.metrics["log_loss"] == pytest.approx(report["folds"][k]["log_loss"])
        assert child.info.status == "FINISHED"
    wb = {r["name"]: r for r in read_runs(out / "wandb")}
    assert set(wb) == {"run", "run/fold=0", "run/fold=1"}
    assert wb["run"]["summary"]["cv_log_loss"] == pytest.approx(report["cv_log_loss"])
    assert [h["_step"] for h in wb["run/fold=0"]["history"]] == [s for s, _ in report["recipe"]["loss_curves"]["0"]]


def test_the_report_carries_its_recipe_and_the_console_names_it(tracked_run):
    out, _, res = tracked_run
    recipe = json.loads((out / "report.json").read_text())["recipe"]
    assert recipe["data_sha256"] == hashlib.sha256(DATA.read_bytes()).hexdigest() and recipe["data_rows"] == 60
    assert recipe["non_default"]["train.lr"] == 1e-3 and recipe["non_default"]["model.init"] == "random"
    assert "train.epochs" not in recipe["non_default"]  # the smoke config keeps the default
    assert recipe["started_at"] < recipe["ended_at"] and 0 < recipe["wall_seconds"] < 900
    assert recipe["gpu_type"] is None and recipe["tensorboard"] == f"tensorboard --logdir {out / 'tensorboard'}"
    html = (out / "report.html").read_text()
    assert "<h2>Recipe</h2>" in html and "training loss per fold" in html and recipe["data_sha256"] in html
    md = (out / "report.md").read_text()
    assert "## Recipe" in md and "report_plots/loss.png" in md and (out / "report_plots" / "loss.png").exists()
    assert f"report: {out / 'report.html'}" in res.stdout


def test_a_sweep_logs_one_run_per_trial(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {grid: [1.0e-3, 2.0e-3]}\n")
    out, uri = tmp_path / "sweep", f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = subprocess.run([sys.executable, "-m", "orchestrator.tune", "--config", str(CONFIGS / "smoke.yaml"), "--space",
                          str(space), "--num-samples", "1", "--folds", "0", "--scheduler", "none", "--out", str(out),
                          "data.max_rows=40", f"tracking.mlflow={uri}"], cwd=REPO, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "warning: tracking" not in res.stderr
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and sorted(r.data.params["train.lr"] for r in trials) == ["0.001", "0.002"]
    for trial in trials:
        name = trial.info.run_name  # trial=<id>: the trial's own run directory
        report = json.loads((out / name / "report.json").read_text())
        assert trial.data.metrics["log_loss"] == pytest.approx(report["cv_log_loss"])
        assert {a.path for a in client.list_artifacts(trial.info.run_id)} >= {"report.json", "report.html"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"leaderboard.csv", "best.yaml"}
    assert parent.data.metrics["best_log_loss"] == pytest.approx(min(t.data.metrics["log_loss"] for t in trials))
