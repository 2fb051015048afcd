"""A fold that cannot start is reported, then the run ends: Ray 2.60 retries a worker group that times out waiting for
its resources without limit (a run once printed nothing for 37 minutes); ``cluster.start_attempts`` bounds the tries
(Ray Train's FailureConfig.controller_failure_limit), and the console names the fold and Ray's root error."""

import subprocess
import sys
import time

import pytest

from orchestrator.cluster.folds import fold_failure_config
from tests.conftest import CONFIGS, REPO
from tests.orchestrator.cluster.test_multinode import cluster  # noqa: F401 - the fixture
from trainer_core.config import Config, ConfigError, apply_overrides, validate

TINY = ["data.max_rows=30", "train.max_steps=2", "train.log_every=1", "data.max_length=64"]
# Another job holds the worker node's only CPU: the fold's worker group can never get its resources.
HOLD_THE_CPU = """
import sys, ray
from ray.util.placement_group import placement_group
ray.init(address=sys.argv[1], logging_level="ERROR")
ray.get(placement_group([{"CPU": 1}], lifetime="detached").ready(), timeout=60)
"""


def test_start_attempts_bound_ray_trains_start_retries():
    assert fold_failure_config(Config()).controller_failure_limit == 9  # default 10 tries: 9 retries
    cfg = apply_overrides(Config(), {"cluster.start_attempts": 1, "cluster.max_failures": 3})
    assert (fold_failure_config(cfg).controller_failure_limit, fold_failure_config(cfg).max_failures) == (0, 3)
    assert fold_failure_config(apply_overrides(Config(), {"cluster.start_attempts": None})).controller_failure_limit \
        == -1  # null: Ray's own unbounded retries
    with pytest.raises(ConfigError, match="cluster.start_attempts: must be >= 1 or null"):
        validate(apply_overrides(Config(), {"cluster.start_attempts": 0}))


@pytest.mark.slow
def test_a_fold_that_cannot_start_fails_within_its_attempts_and_says_so(tmp_path, cluster):  # noqa: F811
    cluster.env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "5"  # each try waits 5 s (Ray's default: 60)
    cluster.start_head()
    cluster.add_worker_node("b")
    cluster.wait_for_nodes(2, 90)
    subprocess.run([sys.executable, "-c", HOLD_THE_CPU, cluster.address], env=cluster.env, check=True, timeout=120)
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "orchestrator.cv", "--config", str(CONFIGS / "smoke.yaml"), "--out",
                          str(tmp_path / "stuck"), "--folds", "0", "--address", cluster.address, *TINY,
                          "cluster.start_attempts=2"], cwd=REPO, env=cluster.env, capture_output=True, text=True,
                         timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-3000:]
    assert time.time() - t0 < 200, out[-3000:]
    failed = [ln for ln in out.splitlines() if ln.startswith("fold 0 failed:")]
    # Ray's root error (WorkerGroupStartupTimeoutError's message), not its ControllerError wrapper
    assert failed and failed[0].startswith("fold 0 failed: The worker group startup timed out"), out[-3000:]
    assert any(ln.startswith("[") and "fold 0: FAILED: The worker group startup timed out" in ln
               for ln in out.splitlines()), out[-3000:]  # said when it failed, not only at the end
    assert "rerun the same command to resume" in out


@pytest.mark.slow
def test_a_fold_that_keeps_failing_is_reported_then_the_run_stops(tmp_path):
    """A fault every try of the fold meets (here a truncated weights file: the driver only checks that the model
    folder has config and weights, the fold cannot load them): once Ray Train's ``cluster.max_failures`` retries are
    spent (none here, to keep the test short: the retries are Ray's), the console names the fold and the root error,
    not Ray's wrapper, and the run ends with exit 1 and the way to resume. No report is written."""
    from tests.tiny_gemma import tiny_gemma2_classifier

    model_dir = tmp_path / "gemma"
    tiny_gemma2_classifier().save_pretrained(model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a download cut short
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "orchestrator.cv", "--config", str(CONFIGS / "smoke.yaml"), "--out",
                          str(out), "--folds", "0", *TINY, "model.init=pretrained", f"model.name_or_path={model_dir}",
                          "cluster.max_failures=0", "cluster.num_cpus=1"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    text = res.stdout + res.stderr
    assert res.returncode == 1, text[-3000:]
    failed = [ln for ln in text.splitlines() if ln.startswith("fold 0 failed:")]
    assert failed and "SafetensorError" in failed[0], text[-3000:]  # the loader's own exception, named
    assert "WorkerGroupError" not in failed[0] and "RayTaskError" not in failed[0], failed[0]
    assert "rerun the same command to resume" in text
    assert not (out / "report.json").exists()
