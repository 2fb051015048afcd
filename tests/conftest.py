"""Shared fixtures: paths to the repo, the bundled data and the configs; a tiny CSV writer for bad-input tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "arena_sample.csv"
CONFIGS = REPO / "configs"


def pytest_configure(config):
    """Before any test runs (not at import): the suite is offline, and tokenizers stay single-threaded in the
    processes tests start. A value set in the environment wins."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def arena_row(i: int, winner: str = "a", prompt=None, a=None, b=None) -> dict:
    onehot = {"a": (1, 0, 0), "b": (0, 1, 0), "tie": (0, 0, 1)}[winner]
    return {
        "id": i, "model_a": "m1", "model_b": "m2",
        "prompt": json.dumps(prompt if prompt is not None else [f"question {i}"]),
        "response_a": json.dumps(a if a is not None else [f"answer a {i}"]),
        "response_b": json.dumps(b if b is not None else [f"answer b {i}"]),
        "winner_model_a": onehot[0], "winner_model_b": onehot[1], "winner_tie": onehot[2],
    }


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def nf4_gemma2_dir(tmp_path_factory) -> Path:
    """A tiny Gemma-2 checkpoint stored pre-quantized to nf4 with a Gemma tokenizer (tests/tiny_gemma.py)."""
    from tests.tiny_gemma import save_prequantized_gemma2

    return save_prequantized_gemma2(tmp_path_factory.mktemp("tiny-gemma2-bnb-4bit"))


@pytest.fixture
def s3():
    """A local S3-compatible server (moto, in this process, on a free port) with a bucket ``runs``; this process's
    environment points AWS_ENDPOINT_URL and test credentials at it while the test runs (tests/s3_server.py)."""
    from tests.s3_server import s3_server

    with s3_server() as server:
        yield server
