"""Faults injected for real, the helpers: a run of orchestrator.cv started in its own session, waited on, its Ray Train
workers found and killed by pid, the whole run killed at once, its OOF file checked. test_interrupt.py's chain uses
them (the whole run killed, Ctrl-C, SIGTERM, then a Train worker killed mid-fold), as do test_multinode.py,
test_two_runs.py and test_storage_e2e.py."""

import contextlib
import subprocess
import sys
import time

import pandas as pd
import psutil

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


def check_oof(out, folds):
    oof = pd.read_parquet(out / "oof.parquet")
    ids = pd.read_csv(DATA, usecols=["id"]).head(60)["id"]
    expected = sorted(i for i in ids if i % 5 in folds)
    assert sorted(oof["id"]) == expected and oof["id"].is_unique
