"""A missing or conflicting model stops cv, tune and predict with one line before Ray starts, and nothing is written.

The Hub is made unreachable (HF_ENDPOINT on a closed local port) or offline (HF_HUB_OFFLINE=1, as a user sets it);
the cache is an empty folder, so no test touches the network or the machine's own cache."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import CONFIGS, DATA, REPO

MISSING = "nobody/gemma-2-tiny-bnb-4bit"
PRETRAINED = ["model.init=pretrained", f"model.name_or_path={MISSING}", "model.tokenizer=null"]


def run(module, *args, offline: bool, hf_home):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens on port 9 (discard)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


def test_cv_refuses_a_model_the_hub_cannot_serve_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    res = run("orchestrator.cv", "--config", CONFIGS / "smoke.yaml", "--out", out, *PRETRAINED, offline=False,
              hf_home=tmp_path / "hf")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]  # after the "fetching it" notice
    assert line.startswith(f"error: model.name_or_path: {MISSING} is not in the Hugging Face cache")
    assert "the Hub cannot be reached" in line and f"`hf download {MISSING}`" in line
    assert not out.exists() and "ray" not in res.stdout.lower()


def test_cv_offline_names_the_setting_and_the_download(tmp_path):
    out = tmp_path / "run"
    res = run("orchestrator.cv", "--config", CONFIGS / "smoke.yaml", "--out", out, *PRETRAINED, offline=True,
              hf_home=tmp_path / "hf")
    assert res.returncode == 2
    assert res.stderr.strip() == (f"error: model.name_or_path: {MISSING} is not in the Hugging Face cache "
                                  f"({tmp_path / 'hf' / 'hub'}) and HF_HUB_OFFLINE is set: download it first with "
                                  f"`hf download {MISSING}` (or point model.name_or_path at a local folder)")
    assert not out.exists()


def test_cv_refuses_a_quantization_that_conflicts_with_the_checkpoint(tmp_path, nf4_gemma2_dir):
    out = tmp_path / "run"
    res = run("orchestrator.cv", "--config", CONFIGS / "smoke.yaml", "--out", out, "model.init=pretrained",
              f"model.name_or_path={nf4_gemma2_dir}", "model.tokenizer=null", "model.quantization=int8",
              offline=True, hf_home=tmp_path / "hf")
    assert res.returncode == 2
    assert res.stderr.strip().startswith(f"error: model.quantization=int8 conflicts with the checkpoint: "
                                         f"{nf4_gemma2_dir} is already quantized to nf4")
    assert not out.exists()


def test_tune_refuses_a_missing_model_before_ray(tmp_path):
    out = tmp_path / "sweep"
    res = run("orchestrator.tune", "--config", CONFIGS / "smoke.yaml", "--space",
              CONFIGS / "sweeps" / "smoke_lr_rank.yaml", "--out", out, *PRETRAINED, offline=True,
              hf_home=tmp_path / "hf")
    assert res.returncode == 2 and f"`hf download {MISSING}`" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.fixture
def run_without_base_model(tmp_path):
    """A run directory whose LoRA folds need a base model that is not on this machine (only what predict reads
    before loading a model: run.json, config.yaml, a finished fold's metrics.json and adapter/)."""
    run_dir = tmp_path / "run"
    (run_dir / "fold=0" / "adapter").mkdir(parents=True)
    (run_dir / "fold=0" / "adapter" / "adapter_model.safetensors").write_bytes(b"")  # present: never read here
    (run_dir / "fold=0" / "metrics.json").write_text("{}")
    (run_dir / "run.json").write_text(json.dumps({"n_folds": 5, "folds": [0]}))
    cfg = yaml.safe_load((CONFIGS / "smoke.yaml").read_text())
    cfg["model"].update(init="pretrained", name_or_path=MISSING, tokenizer=None)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run_dir


def test_predict_refuses_a_missing_base_model_and_writes_nothing(run_without_base_model, tmp_path):
    sub = tmp_path / "sub.csv"
    res = run("orchestrator.predict", "--run", run_without_base_model, "--data", DATA, "--out", sub,
              "--no-temperature", offline=True, hf_home=tmp_path / "hf")
    assert res.returncode == 2 and f"`hf download {MISSING}`" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not sub.exists()
