"""Faults injected for real: a Ray Train worker killed by pid mid-fold ends with a complete, correct OOF file. The
whole run killed at once and resumed is one stop of test_interrupt.py's chain; the helpers here serve both (and
test_multinode.py, test_two_runs.py)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import psutil
import pytest

from tests.conftest import CONFIGS, DATA, REPO

SLOW_FOLD = ["data.max_rows=60", "train.max_steps=60", "train.checkpoint_every=5", "train.log_every=5",
             "data.max_length=128"]


def start_cv(out, folds, *overrides, env=None):
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cv", "--config", str(CONFIGS / "smoke.yaml"),
                             "--out", str(out), "--folds", folds, *SLOW_FOLD, *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(pred, timeout, what, proc):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"cv exited ({proc.returncode}) before {what}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def checkpoints(out, fold):
    """Checkpoints Ray Train has registered (listed in its snapshot), not merely files being uploaded."""
    snap = out / "ray" / f"fold={fold}" / "checkpoint_manager_snapshot.json"
    return snap.exists() and "checkpoint_" in snap.read_text()


def descendants(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def train_workers(pid):
    """This run's Ray Train workers: the local cluster is started by the cv process, so they descend from it."""
    return [p for p in descendants(pid) if "RayTrainWorker" in " ".join(p.cmdline() or [])]


def kill_run(proc):
    """SIGKILL the cv driver and every process of its Ray cluster (raylet, GCS, workers), nothing else."""
    for p in [psutil.Process(proc.pid), *descendants(proc.pid)]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@contextlib.contextmanager
def cleaned_up(proc):
    """Whatever happens inside, the run and its Ray processes are gone afterwards."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            kill_run(proc)


def check_fold_resumed(proc, stdout, out, fold, steps):
    """The run ended well after a fault: exit 0, the fold trained all its steps, having resumed from a checkpoint,
    and the OOF file holds each of its ids once."""
    assert proc.returncode == 0, stdout[-4000:]
    metrics = json.loads((out / f"fold={fold}" / "metrics.json").read_text())
    assert metrics["steps"] == steps and metrics["resumed_from_step"] >= 5, stdout[-3000:]
    check_oof(out, {fold})


def check_oof(out, folds):
    oof = pd.read_parquet(out / "oof.parquet")
    ids = pd.read_csv(DATA, usecols=["id"]).head(60)["id"]
    expected = sorted(i for i in ids if i % 5 in folds)
    assert sorted(oof["id"]) == expected and oof["id"].is_unique


@pytest.mark.slow  # orchestrator.cv on a local Ray cluster, a worker killed mid-fold
def test_worker_killed_mid_fold_restarts_from_its_checkpoint(tmp_path):
    out = tmp_path / "kill"
    proc = start_cv(out, "1", "train.max_steps=100")  # long enough to be killed mid-way (~10 s of steps left)
    with cleaned_up(proc):
        wait_for(lambda: checkpoints(out, 1), 240, "the first checkpoint", proc)
        victims = train_workers(proc.pid)
        assert victims, "no Ray Train worker process found"
        for v in victims:
            os.kill(v.pid, signal.SIGKILL)
        stdout, _ = proc.communicate(timeout=400)
    check_fold_resumed(proc, stdout, out, fold=1, steps=100)
