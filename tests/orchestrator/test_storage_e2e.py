"""``cv --out s3://...`` for real, against an S3-compatible server on a local port (moto's server mode,
tests/s3_server.py): three smoke folds on a local Ray cluster (two waves on its two CPUs), with the Ray Train workers
killed once a checkpoint is in the bucket (they resume from it), then the same command again, which finds every fold
finished in the bucket, then ``predict --run s3://...``. One Ray run covers it all, to keep the suite short; nothing
the later commands read may come from a local disk. A whole run killed and resumed from the bucket: test_multinode.py
(a lost node) and by hand."""

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from orchestrator.predict import main as predict_main
from orchestrator.runs.staging import STAGE_PREFIX
from tests.conftest import CONFIGS, DATA, REPO
from tests.orchestrator.cluster.faults import SLOW_FOLD, cleaned_up, start_cv, train_workers, wait_for

pytestmark = pytest.mark.slow  # two orchestrator.cv runs on a local Ray cluster
FOLDS = [0, 1, 2]
FOLD_ARG = "0-2"


def s3_checkpoints(s3, prefix):
    """Folds with a checkpoint Ray Train has registered in the bucket."""
    return [k for k in FOLDS if s3.checkpointed(prefix, k)]


def test_cv_into_s3_survives_a_killed_worker_resumes_from_the_bucket_and_predicts_from_it(s3, tmp_path):
    uri = s3.uri("smoke")
    overrides = ["train.max_steps=20", "data.max_length=64"]
    proc = start_cv(uri, FOLD_ARG, *overrides)
    with cleaned_up(proc):
        wait_for(lambda: s3_checkpoints(s3, "smoke"), 300, "a checkpoint in the bucket", proc)
        killed = s3_checkpoints(s3, "smoke")
        victims = train_workers(proc.pid)
        assert victims, "no Ray Train worker process found"
        for v in victims:
            os.kill(v.pid, signal.SIGKILL)  # Ray Train restarts them from the checkpoint in the bucket
        stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-4000:]
    assert f"report: {uri}/report.html" in stdout

    keys = s3.keys("smoke")
    metrics = {k: json.loads(s3.read(f"smoke/fold={k}/metrics.json")) for k in FOLDS}
    assert all(m["steps"] == 20 for m in metrics.values())
    assert max(metrics[k]["resumed_from_step"] for k in killed) >= 5  # continued from its checkpoint in the bucket
    assert all(f"fold={k}/adapter/adapter_model.safetensors" in keys for k in FOLDS)
    assert all(any(key.startswith(f"tensorboard/fold={k}/events.out.tfevents") for key in keys) for k in FOLDS)
    assert not [key for key in keys if not key.startswith("ray/") and any(  # no temporary key left behind (Ray
        part.startswith(".") for part in key.split("/"))]                    # keeps its own .validate_storage_marker)
    report = json.loads(s3.read("smoke/report.json"))
    assert report["run_dir"] == uri and all(report["recipe"]["loss_curves"][str(k)] for k in FOLDS)
    oof = pd.read_parquet(io.BytesIO(s3.read("smoke/oof.parquet")))
    ids = pd.read_csv(DATA, usecols=["id"]).head(60)["id"]
    assert sorted(oof["id"]) == sorted(i for i in ids if i % 5 in FOLDS) and oof["id"].is_unique
    assert not (REPO / "s3:").exists()

    # A second command, from the bucket alone: every fold is found finished there (no Ray), the report rebuilt.
    s3.client.delete_object(Bucket=s3.bucket, Key="smoke/report.json")
    res = subprocess.run([sys.executable, "-m", "orchestrator.cv", "--config", str(CONFIGS / "smoke.yaml"), "--out",
                          uri, "--folds", FOLD_ARG, *SLOW_FOLD, *overrides], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"folds {FOLDS} already finished in {uri}; skipping them" in res.stdout and "on Ray" not in res.stdout
    assert json.loads(s3.read("smoke/report.json"))["cv_log_loss"] == report["cv_log_loss"]
    pids = [p.name[len(STAGE_PREFIX):].split("-")[0] for p in Path(tempfile.gettempdir()).glob(f"{STAGE_PREFIX}*")]
    assert [pid for pid in pids if not pid.isdigit() or not psutil.pid_exists(int(pid))] == []  # none left over

    unseen = pd.read_csv(DATA).iloc[100:112].drop(columns=["winner_model_a", "winner_model_b", "winner_tie"])
    unseen.to_csv(tmp_path / "test.csv", index=False)
    assert predict_main(["--run", uri, "--data", str(tmp_path / "test.csv"), "--out", str(tmp_path / "sub.csv")]) == 0
    sub = pd.read_csv(tmp_path / "sub.csv")
    p = sub[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy()
    assert list(sub["id"]) == list(unseen["id"]) and np.allclose(p.sum(1), 1.0) and (p > 0).all()
