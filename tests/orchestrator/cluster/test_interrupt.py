"""Ctrl-C (SIGINT) or SIGTERM to a running cv: the folds stop, finished work and the last checkpoints stay, Ray shuts
down, the console says that the same command resumes, exit status 130, and no later phase starts. Before, a SIGINT
in the first phase cancelled its folds, then the next phase trained in full and the run blamed the stopped folds."""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import CONFIGS, REPO
from tests.orchestrator.cluster.test_faults import SLOW_FOLD, check_oof, checkpoints, cleaned_up, start_cv, wait_for

# Three folds on two CPUs: folds 0 and 1 train together, then fold 2 alone on both CPUs (a second phase).
RUN = ["train.max_steps=40", "cluster.num_cpus=2"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_run_and_the_same_command_resumes(tmp_path, sig):
    out = tmp_path / "run"
    proc = start_cv(out, "0-2", *RUN)
    with cleaned_up(proc):
        wait_for(lambda: checkpoints(out, 0) or checkpoints(out, 1), 240, "a checkpoint", proc)
        proc.send_signal(sig)  # to the driver alone, as `kill` does
        t0 = time.time()
        stdout, _ = proc.communicate(timeout=120)
        took = time.time() - t0
    assert proc.returncode == 130, stdout[-3000:]
    assert took < 60, (took, stdout[-3000:])
    assert "interrupted; the same command resumes" in stdout
    assert "training folds [2]" not in stdout and "failed" not in stdout, stdout[-3000:]
    assert not (out / "report.json").exists() and not (out / "ray" / "fold=2").exists()

    res = subprocess.run([sys.executable, "-m", "orchestrator.cv", "--config", str(CONFIGS / "smoke.yaml"), "--out",
                          str(out), "--folds", "0-2", *SLOW_FOLD, *RUN], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    resumed = [json.loads((out / f"fold={k}" / "metrics.json").read_text())["resumed_from_step"] for k in (0, 1)]
    assert max(resumed) >= 5  # the interrupted folds continued from their checkpoints
    check_oof(out, {0, 1, 2})
