"""The efficiency figure's numerator: what each fold would take alone on one GPU, in one run; the random weights it
builds before the clock starts are the ones the folds load."""

import subprocess

import pytest
import torch

from orchestrator import efficiency
from orchestrator.efficiency import one_gpu_seconds, recompilations_text
from tests.conftest import CONFIGS


def test_a_fold_in_pieces_counts_one_load_and_one_prediction():
    # four pieces: 400 s of training in all; the last piece took 150 s, 100 of them training (so 50 s load + predict)
    rotated = {"fold_seconds": 560.0, "train_seconds": 400.0, "last_run_seconds": 150.0,
               "last_run_train_seconds": 100.0}
    assert one_gpu_seconds(rotated) == pytest.approx(450.0)
    plain = {"fold_seconds": 172.0, "train_seconds": 138.0, "last_run_seconds": 172.0, "last_run_train_seconds": 138.0}
    assert one_gpu_seconds(plain) == pytest.approx(172.0)
    assert one_gpu_seconds({"fold_seconds": 90.0, "train_seconds": 70.0}) == 90.0  # metrics from before the split


class Built(Exception):
    """Stops build_model once it has asked for the random weights."""


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16"])
def test_efficiency_builds_the_random_weights_the_folds_load(monkeypatch, tmp_path, precision):
    """The cache key's dtype: orchestrator.efficiency (before the clock) and build_model (in each fold) agree, also for
    train.precision=auto on CPU folds (fp32 there; efficiency used to build a bf16 copy no fold loaded)."""
    import trainer_core.model.build as build
    from trainer_core.config import load_config
    from trainer_core.model.precision import resolve_precision

    asked = []

    def fake_dir(model_cfg, pad_token_id, seed, dtype):
        asked.append(dtype)
        raise Built

    monkeypatch.setattr(build, "random_weights_dir", fake_dir)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1))  # no cv run
    overrides = [f"train.precision={precision}"]
    with pytest.raises(Built):
        efficiency.main(["--config", str(CONFIGS / "smoke.yaml"), "--folds", "0", "--out", str(tmp_path), *overrides])
    cfg = load_config(CONFIGS / "smoke.yaml", overrides)
    device = torch.device("cpu")  # smoke.yaml: CPU folds
    with pytest.raises(Built):
        build.build_model(cfg.model, cfg.lora, pad_token_id=0, device=device, seed=cfg.train.seed,
                          precision=resolve_precision(cfg.train.precision, device))
    assert asked[0] == asked[1] == (torch.bfloat16 if precision == "bf16" else torch.float32)


def test_the_recompilations_line():
    assert recompilations_text({"recompilations": 7}) == "7 recompilations"
    assert recompilations_text({"recompilations": 1}) == "1 recompilation"
    # TORCH_LOGS without recompiles (null), or metrics written before the count existed (no key)
    assert recompilations_text({"recompilations": None}) == recompilations_text({}) == "recompilations not counted"
    helpers = {"compile_helpers": 4, "compile_helpers_s": 52.04, "compile_helpers_failed": 0}
    assert recompilations_text({"recompilations": 3, "compile_helpers": helpers}) == \
        "3 recompilations, 4 compile helpers until 52.0s"
    assert recompilations_text({"recompilations": 3, "compile_helpers": {**helpers, "compile_helpers_failed": 1}}) \
        .endswith("until 52.0s, 1 failed")


def test_a_bad_override_is_one_line_before_any_weights_or_ray(monkeypatch, tmp_path, capsys):
    built = []
    monkeypatch.setattr("trainer_core.model.build.random_weights_dir", lambda *a: built.append(a))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: built.append(a))
    rc = efficiency.main(["--config", str(CONFIGS / "gemma2_9b_fast.yaml"), "--out", str(tmp_path / "e"),
                          "model.init=random", "model.compile=dynamicD"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "model.compile: 'dynamicD' is not one of off, on, dynamic" in err
    assert built == [] and not (tmp_path / "e").exists()


@pytest.mark.parametrize("args, says", [
    (["--predict-also", "model.fp8_predict=true"], "--predict-rows: a number of rows >= 1 (--predict-also needs it)"),
    (["--predict-rows", "-3"], "--predict-rows: a number of rows >= 1"),
    (["--predict-rows", "8", "--predict-also", "lora.r=4"], "lora.r: cannot be overridden for prediction"),
])
def test_a_bad_prediction_request_is_one_line_before_any_weights_or_ray(monkeypatch, tmp_path, capsys, args, says):
    built = []
    monkeypatch.setattr("trainer_core.model.build.random_weights_dir", lambda *a: built.append(a))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: built.append(a))
    rc = efficiency.main(["--config", str(CONFIGS / "gemma2_9b_fast.yaml"), "--out", str(tmp_path / "e"),
                          "model.init=random", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and says in err
    assert built == [] and not (tmp_path / "e").exists()
