"""A worker node lost mid-fold, for real: a local multi-node Ray cluster on this machine (``ray start --head`` with
0 CPUs plus a worker node with the CPU a fold needs), ``cv --address`` joined to it, the worker node killed by pid
(its raylet, agents and workers) once the fold it trains has a checkpoint, and a replacement node started. The run
must end with exit code 0, a complete OOF file and a fold that resumed from its checkpoint.

The nodes share no run directory: it lives in an S3-compatible bucket (moto's server on a local port,
tests/s3_server.py) that every node reaches over HTTP, as a cluster without a shared disk would. The fold's worker on
node b reads its data from there, Ray Train keeps its checkpoints there, and the replacement node resumes from there.

The cluster runs with Ray's token authentication (RAY_AUTH_MODE=token, the token in RAY_AUTH_TOKEN), as a real one
should: ``cv --address`` joins it with the token, and the dashboard refuses a request without it.

The cluster is this test's own: a temporary ``--temp-dir``, ports picked free for every process, and a marker in the
environment of every process it starts, so teardown kills exactly those processes and nothing else."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pandas as pd
import psutil
import pytest
from ray.util.state import StateApiClient
from ray.util.state.common import ListApiOptions, StateResource

from tests.conftest import DATA
from tests.orchestrator.cluster.faults import cleaned_up, start_cv, wait_for

RAY = str(Path(sys.executable).with_name("ray"))
MARK = "ORCHESTRATOR_TEST_RAY_CLUSTER"  # set in every process of the test cluster (inherited by raylets' workers)
# `ray start` waits a fixed 30 s for its raylet to register with the GCS (ray/_private/node.py; the
# RAY_raylet_start_wait_time_s its message suggests is not read), then exits with this. On a cold 2-core machine the
# first start can take longer (CI once failed so, on the head); the cluster is then started again from scratch.
RAY_GAVE_UP = "The current node timed out during startup"
START_TRIES = 3
NODE_RESOURCES = '{"node_b": 1}'


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


class LocalCluster:
    """``ray start --block`` per node, so each node's processes (raylet, agents, workers) descend from one pid."""

    def __init__(self, root: Path):
        self.root = root
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        self.token = uuid.uuid4().hex  # this cluster's own, never written to ~/.ray
        self.env = {**env, MARK: str(root), "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    # The GCS declares a silent node dead after ~3 s instead of Ray's default ~15 s or more.
                    "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                    "RAY_health_check_timeout_ms": "2000", "RAY_health_check_failure_threshold": "3"}
        self.nodes: dict[str, subprocess.Popen] = {}
        self.workers: list[str] = []  # worker nodes asked for, in order, so a restarted cluster gets them again
        self.address = self.dashboard = ""
        self.starts = 1

    def _start(self, name: str, args: list[str], ports: list[int]) -> None:
        node_ports = dict(zip(["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                               "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"],
                              ports))
        cmd = [RAY, "start", "--block", "--disable-usage-stats", "--object-store-memory=100000000",
               "--min-worker-port=0", "--max-worker-port=0", *args, *(f"{k}={v}" for k, v in node_ports.items())]
        with open(self.log(name), "w") as log:
            self.nodes[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def log(self, name: str) -> Path:
        return self.root / f"{name}-{self.starts}.log"

    def start_head(self) -> None:
        gcs, client, dash, *ports = free_ports(9)
        self.address, self.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
        # A head kept free of work, as on many production clusters: no CPUs and no memory resource for workers.
        # Anything a scheduler may put on any node then goes to the worker node, so a fold's trial driver survives
        # the node's loss only because it asks for the head (ray_folds.TRIAL_RESOURCES).
        self._start("head", ["--head", "--num-cpus=0", "--memory=0", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                             f"--temp-dir={self.root / f'ray{self.starts}'}", f"--ray-client-server-port={client}",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"],
                    ports)

    def add_worker_node(self, name: str) -> None:
        self.workers.append(name)
        self._start(name, [f"--address={self.address}", "--num-cpus=1", f"--resources={NODE_RESOURCES}"],
                    free_ports(6))

    def state(self, resource: StateResource, **filters) -> list:
        """Ray's State API on this cluster's dashboard, with the cluster's token."""
        client = StateApiClient(address=self.dashboard, headers={"Authorization": f"Bearer {self.token}"})
        options = ListApiOptions(filters=[(k, "=", v) for k, v in filters.items()], detail=True, limit=1000, timeout=10)
        return client.list(resource, options, raise_on_missing_output=False)

    def alive_nodes(self) -> list:
        try:
            return self.state(StateResource.NODES, state="ALIVE")
        except Exception:  # noqa: BLE001 - the dashboard is not up yet
            return []

    def wait_for_nodes(self, n: int, timeout: float) -> list:
        """The n nodes started so far, once all are alive. A `ray start` that gave up waiting for its own raylet
        (RAY_GAVE_UP) has the whole cluster started again, up to START_TRIES starts; any other exit fails the test."""
        end = time.time() + timeout
        while time.time() < end:
            for name, p in self.nodes.items():
                if p.poll() is not None:
                    log = self.log(name).read_text()
                    if RAY_GAVE_UP in log and self.starts < START_TRIES:
                        self.restart()
                        return self.wait_for_nodes(n, timeout)
                    raise AssertionError(f"ray start for {name} exited ({p.returncode}) on start {self.starts}: "
                                         f"{log[-3000:]}")
            nodes = self.alive_nodes()
            if len(nodes) == n:
                return nodes
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {n} live Ray nodes")

    def kill_node(self, name: str) -> list[int]:
        """SIGKILL the node's `ray start`, raylet, agents and workers at once; returns their pids."""
        procs = tree(self.nodes.pop(name).pid)
        kill_all(procs)
        return [p.pid for p in procs]

    def restart(self) -> None:
        """Every process of the cluster killed, then the head and the worker nodes asked for started again, with new
        ports and a new Ray temp dir (the logs of earlier starts stay in the cluster's root)."""
        self.kill_everything()
        self.starts += 1
        workers, self.workers = self.workers, []
        self.start_head()
        for name in workers:
            self.add_worker_node(name)

    def kill_everything(self) -> None:
        for name in list(self.nodes):
            self.kill_node(name)
        # anything of this cluster that left the trees (e.g. a worker forked as its raylet died)
        strays = []
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and p.environ().get(MARK) == str(self.root):
                    strays.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        kill_all(strays)

    def teardown(self) -> None:
        self.kill_everything()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def cluster():
    # Not under tmp_path: Ray's unix socket paths under <temp-dir>/session_*/sockets must stay under 108 bytes.
    c = LocalCluster(Path(tempfile.mkdtemp(prefix="raymn-", dir="/tmp")))
    try:
        yield c
    finally:
        c.teardown()


def actors(cluster: LocalCluster, **filters) -> list:
    return cluster.state(StateResource.ACTORS, **filters)


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow  # a local multi-node Ray cluster and orchestrator.cv on it
def test_worker_node_lost_mid_fold_resumes_on_a_replacement_node(s3, cluster):
    cluster.env.update(s3.env)  # every node reaches the bucket (credentials from its own environment)
    cluster.start_head()
    cluster.add_worker_node("b")
    nodes = cluster.wait_for_nodes(2, 90)
    head = next(n.node_id for n in nodes if n.is_head_node)
    node_b = next(n.node_id for n in nodes if not n.is_head_node)
    assert http_status(f"{cluster.dashboard}/api/v0/nodes") == 401  # token authentication is on

    out = s3.uri("multinode")
    proc = start_cv(out, "1", "--address", cluster.address, "train.max_steps=200", env=cluster.env)
    with cleaned_up(proc):
        wait_for(lambda: s3.checkpointed("multinode", 1), 240, "fold 1's first checkpoint in the bucket", proc)
        # The fold's Train worker is on node b (the only node with CPUs), its trial driver and Train controller on
        # the head (ray_folds.TRIAL_RESOURCES), and the worker's pid is one of node b's processes.
        workers = actors(cluster, class_name="RayTrainWorker", state="ALIVE")
        assert [w.node_id for w in workers] == [node_b], workers
        drivers = actors(cluster, class_name="ImplicitFunc", state="ALIVE") + \
            actors(cluster, class_name="TrainController", state="ALIVE")
        assert len(drivers) == 2 and {d.node_id for d in drivers} == {head}, drivers
        b_pids = {p.pid for p in tree(cluster.nodes["b"].pid)}
        assert workers[0].pid in b_pids, (workers[0].pid, b_pids)

        killed = cluster.kill_node("b")
        assert workers[0].pid in killed
        wait_for(lambda: node_b not in {n.node_id for n in cluster.alive_nodes()}, 60, "node b declared dead", proc)

        cluster.add_worker_node("b2")  # the same resources come back on a new node
        stdout, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, stdout[-4000:]
    metrics = json.loads(s3.read("multinode/fold=1/metrics.json"))
    assert metrics["steps"] == 200 and metrics["resumed_from_step"] >= 5, stdout[-3000:]
    oof = pd.read_parquet(io.BytesIO(s3.read("multinode/oof.parquet")))
    assert sorted(oof["id"]) == sorted(i for i in pd.read_csv(DATA, usecols=["id"]).head(60)["id"] if i % 5 == 1)
    assert oof["id"].is_unique
    # the restarted worker ran on the replacement node
    nodes_now = {n.node_id for n in cluster.alive_nodes()} - {head}
    assert {w.node_id for w in actors(cluster, class_name="RayTrainWorker")} & nodes_now, stdout[-3000:]
