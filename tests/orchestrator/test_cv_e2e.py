"""The real end-to-end path: orchestrator.cv on a local Ray cluster (CPU workers), all five folds of the tiny
Gemma-2 smoke config on a slice of the bundled data, checked against the run-directory contract row for row. One
cell of the slice holds a lone UTF-16 surrogate escape (half an emoji, as rows of the real Kaggle train.csv do), which
used to end the run with a pyarrow UnicodeEncodeError: the run must reach its full report.

The same run tracks itself with MLflow (a sqlite store) and W&B (offline): what the trackers got is read back with
their own clients and checked against the run's files (the child runs' training-loss steps are the TensorBoard curve
the report draws; the parent's CV log loss is report.json's), and the report carries its recipe. One run for both
saves a Ray cluster and two folds (it was test_tracking_e2e.py's own run); the tracker tests come before the reruns,
which log into the same parent run."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss as sk_log_loss

from tests.conftest import CONFIGS, DATA, REPO
from tests.orchestrator.tracking.wandb_log import read_runs

pytestmark = pytest.mark.slow  # every test here runs orchestrator.cv on a local Ray cluster (or reads such a run)

N_ROWS = 100
BROKEN_ROW = 7  # its response_a holds "broken emoji \ud83d here"


def cv(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "orchestrator.cv", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data_args(tmp_path_factory):
    """The first N_ROWS rows of the bundled data, one of them with a lone surrogate, as cv overrides."""
    df = pd.read_csv(DATA, dtype=str, keep_default_na=False).head(N_ROWS)
    df.loc[BROKEN_ROW, "response_a"] = json.dumps(["broken emoji \ud83d here"])  # json writes the escape as text
    path = tmp_path_factory.mktemp("data") / "arena_with_surrogate.csv"
    df.to_csv(path, index=False)
    return [f"data.path={path}", f"data.max_rows={N_ROWS}"]


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_args, mlflow_uri):
    out = tmp_path_factory.mktemp("cv") / "run"
    res = cv("--config", CONFIGS / "smoke.yaml", "--folds", "0-4", "--out", out, *data_args,
             f"tracking.mlflow={mlflow_uri}", "tracking.wandb=offline")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return out, res


def test_a_lone_surrogate_is_repaired_reported_once_and_recorded(smoke_run):
    out, res = smoke_run
    broken_id = int(pd.read_csv(DATA).loc[BROKEN_ROW, "id"])
    assert res.stderr.count("UTF-8 cannot encode") == 1 and f"id {broken_id}" in res.stderr
    meta = json.loads((out / "run.json").read_text())
    assert meta["text_repaired"]["count"] == 1 and meta["text_repaired"]["ids"] == [broken_id]
    assert meta["fold_by"] == "id"
    rows = pd.read_parquet(out / "data.parquet").set_index("id")
    assert rows.loc[broken_id, "response_a"] == "broken emoji \ufffd here"
    report = json.loads((out / "report.json").read_text())
    assert report["fold_by"] == "id" and "data.fold_by=id" in (out / "report.md").read_text()
    assert "data.fold_by=id" in (out / "report.html").read_text()


def test_run_directory_matches_the_contract(smoke_run):
    out, res = smoke_run
    data = pd.read_csv(DATA).head(N_ROWS)
    label = np.argmax(data[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy(), axis=1)
    truth = pd.DataFrame({"id": data["id"], "label": label, "fold": data["id"] % 5}).sort_values("id")

    oof = pd.read_parquet(out / "oof.parquet")
    assert list(oof.columns) == ["id", "fold", "label", "p_a", "p_b", "p_tie"]
    assert len(oof) == N_ROWS and oof["id"].is_unique
    merged = truth.merge(oof, on="id", suffixes=("", "_oof"), validate="one_to_one")
    assert (merged["label"] == merged["label_oof"]).all() and (merged["fold"] == merged["fold_oof"]).all()
    probs = oof[["p_a", "p_b", "p_tie"]].to_numpy()
    assert np.allclose(probs.sum(1), 1) and (probs > 0).all()

    report = json.loads((out / "report.json").read_text())
    assert report["cv_log_loss"] == pytest.approx(sk_log_loss(oof["label"], probs, labels=[0, 1, 2]), abs=1e-12)
    assert report["cv_accuracy"] == pytest.approx((probs.argmax(1) == oof["label"]).mean())
    assert report["n_rows"] == N_ROWS and report["prior_log_loss"] > 0
    assert [f["fold"] for f in report["folds"]] == [0, 1, 2, 3, 4]
    for f in report["folds"]:
        sel = oof[oof["fold"] == f["fold"]]
        assert f["n_rows"] == len(sel)
        assert f["log_loss"] == pytest.approx(sk_log_loss(sel["label"], sel[["p_a", "p_b", "p_tie"]], labels=[0, 1, 2]))
        fdir = out / f"fold={f['fold']}"
        fold_oof = pd.read_parquet(fdir / "oof.parquet")
        assert sorted(fold_oof["id"]) == sorted(truth.loc[truth["fold"] == f["fold"], "id"])
        assert (fdir / "metrics.json").exists() and (fdir / "config.yaml").exists()
        assert (fdir / "adapter" / "adapter_model.safetensors").exists()
        assert (fdir / "adapter" / "tokenizer_config.json").exists()
        assert list((out / "tensorboard" / f"fold={f['fold']}").iterdir())
    assert any((out / "logs" / "ray").iterdir()), "the Ray session's logs are linked from the run directory"
    md = (out / "report.md").read_text()
    assert f"{report['cv_log_loss']:.4f}" in md
    # the printed table ends the command, with the run directory
    assert f"{report['cv_log_loss']:.4f}" in res.stdout and str(out) in res.stdout
    assert "class-prior log loss" in res.stdout


def test_mlflow_and_wandb_hold_the_runs_folds_steps_and_report(smoke_run, mlflow_uri):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    out, res = smoke_run
    assert "warning: tracking" not in res.stderr
    report = json.loads((out / "report.json").read_text())
    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {f"fold={k}" for k in range(5)}
    assert parent.data.params["train.lr"] == "0.002" and parent.data.params["model.tokenizer"] == "bytes"
    assert parent.data.params["data.max_rows"] == str(N_ROWS)
    assert parent.data.metrics["cv_log_loss"] == pytest.approx(report["cv_log_loss"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"report.html", "report.json",
                                                                          "oof.parquet"}
    for k in range(5):
        child = children[f"fold={k}"]
        history = client.get_metric_history(child.info.run_id, "train_loss")
        curve = report["recipe"]["loss_curves"][str(k)]
        assert curve and [(m.step, m.value) for m in history] == [(s, pytest.approx(v)) for s, v in curve], k
        assert client.get_metric_history(child.info.run_id, "lr") and child.data.metrics["samples_per_s"] > 0, k
        assert child.data.metrics["log_loss"] == pytest.approx(report["folds"][k]["log_loss"]), k
        assert child.info.status == "FINISHED", k
    wb = {r["name"]: r for r in read_runs(out / "wandb")}
    assert set(wb) == {"run", *(f"run/fold={k}" for k in range(5))}
    assert wb["run"]["summary"]["cv_log_loss"] == pytest.approx(report["cv_log_loss"])
    assert [h["_step"] for h in wb["run/fold=0"]["history"]] == [s for s, _ in report["recipe"]["loss_curves"]["0"]]


def test_the_report_carries_its_recipe_and_the_console_names_it(smoke_run, data_args):
    out, res = smoke_run
    recipe = json.loads((out / "report.json").read_text())["recipe"]
    data_path = data_args[0].split("=", 1)[1]
    assert recipe["data_sha256"] == hashlib.sha256(open(data_path, "rb").read()).hexdigest()
    assert recipe["data_rows"] == N_ROWS
    assert recipe["non_default"]["train.lr"] == 2e-3 and recipe["non_default"]["model.init"] == "random"
    assert "train.epochs" not in recipe["non_default"]  # the smoke config keeps the default
    assert recipe["started_at"] < recipe["ended_at"] and 0 < recipe["wall_seconds"] < 900
    assert recipe["gpu_type"] is None and recipe["tensorboard"] == f"tensorboard --logdir {out / 'tensorboard'}"
    html = (out / "report.html").read_text()
    assert "<h2>Recipe</h2>" in html and "training loss per fold" in html and recipe["data_sha256"] in html
    md = (out / "report.md").read_text()
    assert "## Recipe" in md and "report_plots/loss.png" in md and (out / "report_plots" / "loss.png").exists()
    assert f"report: {out / 'report.html'}" in res.stdout


def test_rerun_skips_finished_folds_without_ray(smoke_run, data_args):
    out, _ = smoke_run
    before = (out / "fold=2" / "metrics.json").stat().st_mtime_ns
    res = cv("--config", CONFIGS / "smoke.yaml", "--folds", "0-4", "--out", out, *data_args, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already finished" in res.stdout and "training folds" not in res.stdout
    assert (out / "fold=2" / "metrics.json").stat().st_mtime_ns == before


def test_changed_config_for_same_run_dir_is_refused(smoke_run, data_args):
    out, _ = smoke_run
    res = cv("--config", CONFIGS / "smoke.yaml", "--folds", "0-4", "--out", out, *data_args, "train.lr=0.5",
             timeout=120)
    assert res.returncode == 2 and "different config" in res.stderr and "--restart" in res.stderr


def test_report_reruns_standalone_and_refuses_a_missing_fold(smoke_run, tmp_path):
    import shutil

    out, _ = smoke_run
    res = subprocess.run([sys.executable, "-m", "orchestrator.report", str(out)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("ray", "adapter"))
    (copy / "report.json").unlink()
    (copy / "fold=3" / "metrics.json").unlink()
    res = subprocess.run([sys.executable, "-m", "orchestrator.report", str(copy)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1 and "fold 3 has not finished" in res.stderr
    assert not (copy / "report.json").exists()


def test_rotated_schedule_gives_the_same_oof_as_waves_and_runs_without_the_dashboard(smoke_run, data_args, tmp_path):
    """cluster.rotate_folds: three folds on two CPU slots run as three phases of two half-folds each (every fold paused
    at its checkpoint halfway and resumed in a later phase). Exact resume makes the OOF the same as the plain
    schedule's folds (tolerance: float sums in another order).

    On Ray without the dashboard (State API), as on the GPU image: Train V2 then leaves finished folds' placement groups
    reserved, and the next phase used to wait forever. Folds now run in waves with the leftovers freed in between, so
    each of the three phases must start and the run must finish. (This was its own three-fold run; the rotated run
    proves the same with three phases.)"""
    import os

    out = tmp_path / "rotated"
    env = {**os.environ, "ORCHESTRATOR_RAY_DASHBOARD": "0"}
    res = subprocess.run([sys.executable, "-m", "orchestrator.cv", "--config", str(CONFIGS / "smoke.yaml"), "--folds",
                          "0-2", "--out", str(out), *data_args, "cluster.rotate_folds=true"],
                         cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "waves of 2" in res.stdout, "without the dashboard, folds must run in waves: " + res.stdout[-3000:]
    assert res.stdout.count("training folds") == 3 and res.stdout.count("paused at step") == 3, res.stdout[-3000:]
    for k in range(3):
        m = json.loads((out / f"fold={k}" / "metrics.json").read_text())
        assert m["resumed_from_step"] == round(m["steps"] / 2), (k, m)  # the second piece started from the pause
    plain = pd.read_parquet(smoke_run[0] / "oof.parquet").query("fold <= 2").sort_values("id").reset_index(drop=True)
    rotated = pd.read_parquet(out / "oof.parquet").sort_values("id").reset_index(drop=True)
    assert json.loads((out / "report.json").read_text())["n_rows"] == len(plain)
    assert (plain[["id", "fold", "label"]] == rotated[["id", "fold", "label"]]).all().all()
    np.testing.assert_allclose(rotated[["p_a", "p_b", "p_tie"]].to_numpy(), plain[["p_a", "p_b", "p_tie"]].to_numpy(),
                               atol=1e-4)
