"""Ray's environment: nothing is set when orchestrator modules are imported; init_ray gives Ray's workers their
settings through the job's runtime_env (a value the user set wins) and leaves Ray's token authentication on."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # starts a local Ray cluster in a subprocess

PROBE = """
import json, os, sys
keys = sys.argv[1:]
before = {k: os.environ.get(k) for k in keys}
import orchestrator.bench, orchestrator.cv, orchestrator.predict
import orchestrator.cluster.folds, orchestrator.cluster.sweep_trials
import orchestrator.tune
import ray
from orchestrator.cluster import folds as ray_folds
after_import = {k: os.environ.get(k) for k in keys}
ray_folds.init_ray(None, 1)
worker = ray.get(ray.remote(lambda: {k: os.environ.get(k) for k in keys}).options(num_cpus=0).remote())
print(json.dumps({"before": before, "after_import": after_import, "driver": {k: os.environ.get(k) for k in keys},
                  "worker": worker}))
"""


def test_ray_settings_reach_workers_through_runtime_env_and_auth_stays_on():
    from orchestrator.cluster.folds import DRIVER_ENV, WORKER_ENV

    keys = sorted({*DRIVER_ENV, *WORKER_ENV, "RAY_AUTH_MODE"})
    env = {k: v for k, v in os.environ.items() if k not in keys and k != "RAY_ADDRESS"}
    env["TOKENIZERS_PARALLELISM"] = "true"  # the user's own value
    res = subprocess.run([sys.executable, "-c", PROBE, *keys], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert seen["after_import"] == seen["before"]  # importing sets nothing
    for k, v in WORKER_ENV.items():
        assert seen["worker"][k] == ("true" if k == "TOKENIZERS_PARALLELISM" else v), k
    for k, v in DRIVER_ENV.items():
        assert seen["driver"][k] == v, k
    # Ray 2.60 turns token authentication on for a new local cluster; nothing here turns it off.
    assert seen["driver"]["RAY_AUTH_MODE"] == "token" and seen["worker"]["RAY_AUTH_MODE"] != "disabled"
