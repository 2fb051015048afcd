import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from tests.conftest import CONFIGS, DATA, REPO, arena_row


def run(module, *args, timeout=180):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_help_documents_every_flag():
    res = run("orchestrator.cv", "--help")
    assert res.returncode == 0
    for flag in ("--config", "--folds", "--out", "--address", "--print-config", "--format", "--restart",
                 "--help-config",
                 "key=value", "python -m orchestrator.cv --folds 0-4"):
        assert flag in res.stdout, flag


def test_print_config_resolves_defaults_yaml_and_overrides():
    res = run("orchestrator.cv", "--config", CONFIGS / "smoke.yaml", "--print-config", "train.lr=0.5", "lora.r=4")
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    assert cfg["train"]["lr"] == 0.5 and cfg["lora"]["r"] == 4 and cfg["experiment"] == "smoke"
    res = run("orchestrator.cv", "--print-config", "--format", "json")
    assert json.loads(res.stdout)["experiment"] == "demo_cpu"  # the embedded default


def test_help_config_lists_keys():
    res = run("orchestrator.cv", "--help-config")
    assert "train.lr = 0.0002" in res.stdout and "lora.freeze_layers" in res.stdout
    text = " ".join(res.stdout.split())
    assert 'data.fold_by = "id"' in text and "StratifiedGroupKFold" in text
    assert "data.prompt_share = null" in text and "'left' keeps its end" in text
    assert 'model.head = "joint"' in text and "Bradley-Terry" in text
    assert "train.swap_augment = false" in text and "data.extra_train_path = null" in text


def test_bad_extra_rows_stop_before_ray_and_write_nothing(tmp_path):
    rows = [arena_row(i) for i in range(1, 6)]
    rows[2]["winner_tie"] = 1  # two winners
    bad = tmp_path / "extra.csv"
    pd.DataFrame(rows).to_csv(bad, index=False)
    out = tmp_path / "run"
    res = run("orchestrator.cv", "--config", CONFIGS / "smoke.yaml", "--out", out, f"data.extra_train_path={bad}")
    assert res.returncode == 2
    labels = "columns winner_model_a, winner_model_b, winner_tie"
    assert f"error: {bad}: {labels}: id 3: exactly one must be 1" in res.stderr
    assert not out.exists()


def test_freeze_layers_past_the_models_depth_stops_before_ray_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    res = run("orchestrator.cv", "--config", CONFIGS / "smoke.yaml", "--out", out, "lora.freeze_layers=99")
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: lora.freeze_layers=99 leaves no layer to train: the model has ")
    assert not out.exists() and "ray" not in res.stdout.lower()


def test_bad_override_is_one_clear_error():
    res = run("orchestrator.cv", "--config", CONFIGS / "smoke.yaml", "train.lr=abc")
    assert res.returncode == 2 and "train.lr: expected a number" in res.stderr


def test_bad_data_stops_before_ray_and_writes_nothing(tmp_path):
    rows = [arena_row(i) for i in range(1, 11)]
    rows[3]["response_a"] = "['python', 'literal']"
    bad = tmp_path / "bad.csv"
    pd.DataFrame(rows).to_csv(bad, index=False)
    out = tmp_path / "run"
    res = run("orchestrator.cv", "--config", CONFIGS / "smoke.yaml", "--out", out, f"data.path={bad}")
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: {bad}: column 'response_a': id 4: not a JSON list of strings"
    assert not out.exists()
    assert "ray" not in res.stdout.lower()


def test_gpu_config_on_a_machine_without_gpus_says_why(tmp_path):
    # random weights, byte tokenizer: the 9B checkpoint is not on this machine (the weights check would stop first)
    res = run("orchestrator.cv", "--config", CONFIGS / "gemma2_9b_qlora.yaml", "--folds", "0", "--out",
              tmp_path / "g", "data.max_rows=50", "model.init=random", "model.tokenizer=bytes", timeout=300)
    assert res.returncode == 3
    assert "cluster.gpus_per_fold=1" in res.stderr and "has 0 GPU(s)" in res.stderr
    # one line, before Ray starts and before anything is written: a rerun is not refused as "a different config"
    assert len(res.stderr.strip().splitlines()) == 1 and "Ray was not started" in res.stderr
    assert not (tmp_path / "g").exists() and "training folds" not in res.stdout


def test_a_joined_cluster_without_enough_gpus_is_refused_from_its_resources():
    from orchestrator.cluster.schedule import ClusterError
    from orchestrator.cv import check_gpus
    from trainer_core.config import load_config

    cfg = load_config(CONFIGS / "smoke.yaml", ["cluster.gpus_per_fold=2"])
    with pytest.raises(ClusterError, match="the Ray cluster has 1 GPU"):
        check_gpus(cfg, {"GPU": 1.0, "CPU": 8.0})
    check_gpus(cfg, {"GPU": 2.0, "CPU": 8.0})
    check_gpus(load_config(CONFIGS / "smoke.yaml"), {"CPU": 1.0})  # CPU folds: nothing to check here


def test_bundled_data_ships_with_attribution():
    readme = (REPO / "data" / "README.md").read_text()
    assert DATA.exists() and "HH-RLHF" in readme and "PandaLM" in readme and "MIT" in readme


def test_overrides_may_come_before_and_after_flags():
    res = run("orchestrator.cv", "train.lr=0.5", "--config", CONFIGS / "smoke.yaml", "lora.r=4", "--print-config")
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    assert cfg["train"]["lr"] == 0.5 and cfg["lora"]["r"] == 4
