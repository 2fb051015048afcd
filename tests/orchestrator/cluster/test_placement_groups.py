"""Placement groups that finished folds leave reserved are freed after each phase on a cluster cv started, with or
without the dashboard: once, on a loaded machine, Train's own cleanup left two and the next phase waited forever."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # each test starts a local Ray cluster in a subprocess

PROBE = """
import json, sys
import ray
from ray.util.placement_group import placement_group
from orchestrator.cluster import folds as ray_folds
from trainer_core.config import Config

address = sys.argv[1] or None
ray_folds.init_ray(None, 2)

def leaky_phase(cfg, phase, *args):  # a phase whose finished fold's worker group stayed reserved
    pg = placement_group([{"CPU": 1}])
    ray.get(pg.ready(), timeout=60)
    return dict.fromkeys(phase)

ray_folds.state_api_available = lambda: True  # the dashboard path: Train is trusted to clean up, and here did not
ray_folds._tune_folds = leaky_phase
cfg = Config()
cfg.cluster.address = address  # a cluster someone else runs: its placement groups are not ours to remove
out = ray_folds.run_folds(cfg, {0: None}, None, 1)
live = [i for i in ray.util.placement_group_table().values() if i["state"] == "CREATED"]
print(json.dumps({"out": {str(k): v for k, v in out.items()}, "live": len(live)}))
"""


def run_probe(address: str) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE, address], cwd=REPO, capture_output=True, text=True,
                         timeout=240, env={**os.environ, "ORCHESTRATOR_RAY_DASHBOARD": "0"})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_a_phase_frees_the_placement_groups_its_folds_left_on_its_own_cluster():
    own = run_probe("")
    assert own == {"out": {"0": None}, "live": 0}


def test_placement_groups_of_a_cluster_given_by_address_are_left_alone():
    theirs = run_probe("ray://not-ours:10001")
    assert theirs == {"out": {"0": None}, "live": 1}
