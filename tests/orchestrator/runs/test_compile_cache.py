"""``cluster.compile_cache``: where a fold's compiled layers go, and that a later process compiling the same graph
reads them back instead of compiling again (what makes folds 2-5 and a sweep's trials start warm)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.runs.compile_cache import compile_cache_dir
from tests.conftest import REPO
from trainer_core.config import load_config

COMPILE_TWICE = """
import json, os, sys
from orchestrator.runs.compile_cache import use_compile_cache
use_compile_cache(sys.argv[1])
import torch
from torch._dynamo.utils import counters  # test-only reading of inductor's cache counters

@torch.compile
def layer(x, w):
    return torch.nn.functional.gelu(x @ w) * 0.5

layer(torch.randn(8, 16), torch.randn(16, 16))
print(json.dumps({k: v for k, v in counters["inductor"].items() if "fxgraph" in k}))
"""


@pytest.mark.parametrize("setting, expected", [("run", "RUN/compile_cache"), ("local", None),
                                               ("/shared/cache", "/shared/cache")])
def test_the_setting_names_a_folder(tmp_path, setting, expected):
    cfg = load_config(REPO / "configs" / "smoke.yaml", [f"cluster.compile_cache={setting}"])
    got = compile_cache_dir(cfg, tmp_path)
    assert got == (None if expected is None else expected.replace("RUN", str(tmp_path)))
    # a run directory on object storage has no folder to compile into: run means each machine's own (local)
    assert compile_cache_dir(cfg, "s3://bucket/run") == (None if setting == "run" else got)


@pytest.mark.slow
def test_a_second_process_reads_the_first_ones_compiled_graph(tmp_path):
    cache = tmp_path / "compile_cache"
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", COMPILE_TWICE, str(cache)], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0].get("fxgraph_cache_miss", 0) >= 1 and not runs[0].get("fxgraph_cache_hit")
    assert runs[1].get("fxgraph_cache_hit", 0) >= 1 and not runs[1].get("fxgraph_cache_miss")
    assert any(Path(cache).rglob("*")), "nothing was written to the configured folder"


def test_a_scoring_process_uses_the_runs_cache_only_where_it_can_serve(tmp_path, monkeypatch):
    """``run_compile_cache`` (orchestrator.predict's path): where the run's folds kept their compiled layers
    (``cluster.compile_cache``), the run's own folder only when it is there and writable; else None, and this
    process's cache left as it was; afterwards the process's settings are back."""
    from orchestrator.runs import compile_cache
    from orchestrator.runs.compile_cache import run_compile_cache
    from trainer_core.config import apply_overrides

    def used(cfg):
        with run_compile_cache(cfg, run) as path:
            return path, os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ.get("TRITON_CACHE_DIR")

    cfg = load_config(REPO / "configs" / "smoke.yaml", ["model.compile=on"])
    run = tmp_path / "run"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/chosen/by/the/user")
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    unchanged = (None, "/chosen/by/the/user", None)
    assert used(apply_overrides(cfg, {"cluster.compile_cache": "local"})) == unchanged  # torch's own folder
    assert used(cfg) == unchanged  # a run that compiled nothing here
    (run / "compile_cache").mkdir(parents=True)
    assert used(apply_overrides(cfg, {"model.compile": "off"})) == unchanged  # eager layers
    with monkeypatch.context() as m:
        m.setattr(compile_cache.os, "access", lambda path, mode: False)
        assert used(cfg) == unchanged  # a read-only copy of a run (a Kaggle input)
    cache = str((run / "compile_cache").resolve())
    assert used(cfg) == (cache, cache, str(Path(cache) / "triton"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/chosen/by/the/user" and "TRITON_CACHE_DIR" not in os.environ
    elsewhere = tmp_path / "volume"  # a configured folder, as the folds had it
    assert used(apply_overrides(cfg, {"cluster.compile_cache": str(elsewhere)}))[0] == str(elsewhere.resolve())
    assert elsewhere.is_dir()
