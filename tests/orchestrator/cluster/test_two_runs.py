"""Two runs on one machine, each with its own local Ray cluster, both finish: every process of a run talks to its own
cluster (RAY_ADDRESS through the job's worker_process_setup_hook), so Ray Train's State API calls in its workers never
meet "Found multiple active Ray instances". Before, the run whose fold 0 finished second kept its placement group
reserved and fold 1 waited for its CPU without end."""

import subprocess
import sys
import time

import pytest

from tests.conftest import CONFIGS, REPO
from tests.orchestrator.cluster.faults import kill_run

TINY = ["data.max_rows=30", "train.max_steps=2", "train.checkpoint_every=1", "train.log_every=1", "data.max_length=64",
        "cluster.num_cpus=1"]  # one CPU: fold 1 starts only once fold 0's placement group is freed


@pytest.mark.slow
def test_two_runs_at_once_on_one_machine_both_finish(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-m", "orchestrator.cv", "--config", str(CONFIGS / "smoke.yaml"),
                               "--out", str(tmp_path / f"run{i}"), "--folds", "0,1", *TINY], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for i in range(2)]
    outs = []
    try:
        end = time.time() + 300
        for p in procs:
            outs.append(p.communicate(timeout=max(1, end - time.time()))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                kill_run(p)
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"run {i}: {out[-3000:]}"
        assert (tmp_path / f"run{i}" / "oof.parquet").exists() and (tmp_path / f"run{i}" / "report.json").exists()
