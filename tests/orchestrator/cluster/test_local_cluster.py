"""One local Ray cluster started as cv starts it (``init_ray``), in a subprocess, probed for two things (one cluster
start, not two: each costs about 20 s on 2 cores):

- Ray's environment: nothing is set when orchestrator modules are imported; init_ray gives Ray's workers their
  settings through the job's runtime_env (a value the user set wins) and leaves Ray's token authentication on.
- Placement groups that finished folds leave reserved are freed after each phase on a cluster cv started, with or
  without the dashboard: once, on a loaded machine, Train's own cleanup left two and the next phase waited forever.
  Those of a cluster given by address are left alone."""

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
from ray.util.placement_group import placement_group
from orchestrator.cluster import folds as ray_folds
from trainer_core.config import Config
after_import = {k: os.environ.get(k) for k in keys}
ray_folds.init_ray(None, 2)
worker = ray.get(ray.remote(lambda: {k: os.environ.get(k) for k in keys}).options(num_cpus=0).remote())
env = {"before": before, "after_import": after_import, "driver": {k: os.environ.get(k) for k in keys},
       "worker": worker}

def leaky_phase(cfg, phase, *args):  # a phase whose finished fold's worker group stayed reserved
    pg = placement_group([{"CPU": 1}])
    ray.get(pg.ready(), timeout=60)
    return dict.fromkeys(phase)

ray_folds.state_api_available = lambda: True  # the dashboard path: Train is trusted to clean up, and here did not
ray_folds._tune_folds = leaky_phase
groups = {}
for name, address in (("own", None), ("theirs", "ray://not-ours:10001")):
    cfg = Config()
    cfg.cluster.address = address  # a cluster someone else runs: its placement groups are not ours to remove
    out = ray_folds.run_folds(cfg, {0: None}, None, 1)
    live = [i for i in ray.util.placement_group_table().values() if i["state"] == "CREATED"]
    groups[name] = {"out": {str(k): v for k, v in out.items()}, "live": len(live)}
print(json.dumps({"env": env, "groups": groups}))
"""


@pytest.fixture(scope="module")
def probed():
    from orchestrator.cluster.folds import DRIVER_ENV, WORKER_ENV

    keys = sorted({*DRIVER_ENV, *WORKER_ENV, "RAY_AUTH_MODE"})
    env = {k: v for k, v in os.environ.items() if k not in keys and k != "RAY_ADDRESS"}
    env["TOKENIZERS_PARALLELISM"] = "true"  # the user's own value
    env["ORCHESTRATOR_RAY_DASHBOARD"] = "0"  # not needed here: the probe stands in for the State API's answer
    res = subprocess.run([sys.executable, "-c", PROBE, *keys], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_ray_settings_reach_workers_through_runtime_env_and_auth_stays_on(probed):
    from orchestrator.cluster.folds import DRIVER_ENV, WORKER_ENV

    seen = probed["env"]
    assert seen["after_import"] == seen["before"], "importing orchestrator modules set environment variables"
    for k, v in WORKER_ENV.items():
        assert seen["worker"][k] == ("true" if k == "TOKENIZERS_PARALLELISM" else v), k
    for k, v in DRIVER_ENV.items():
        assert seen["driver"][k] == v, k
    # Ray 2.60 turns token authentication on for a new local cluster; nothing here turns it off.
    assert seen["driver"]["RAY_AUTH_MODE"] == "token" and seen["worker"]["RAY_AUTH_MODE"] != "disabled"


def test_a_phase_frees_the_placement_groups_its_folds_left_on_its_own_cluster(probed):
    assert probed["groups"]["own"] == {"out": {"0": None}, "live": 0}


def test_placement_groups_of_a_cluster_given_by_address_are_left_alone(probed):
    assert probed["groups"]["theirs"] == {"out": {"0": None}, "live": 1}
