"""The efficiency figure's numerator: what each fold would take alone on one GPU, in one run."""

import pytest

from orchestrator.efficiency import one_gpu_seconds, recompilations_text


def test_a_fold_in_pieces_counts_one_load_and_one_prediction():
    # four pieces: 400 s of training in all; the last piece took 150 s, 100 of them training (so 50 s load + predict)
    rotated = {"fold_seconds": 560.0, "train_seconds": 400.0, "last_run_seconds": 150.0,
               "last_run_train_seconds": 100.0}
    assert one_gpu_seconds(rotated) == pytest.approx(450.0)
    plain = {"fold_seconds": 172.0, "train_seconds": 138.0, "last_run_seconds": 172.0, "last_run_train_seconds": 138.0}
    assert one_gpu_seconds(plain) == pytest.approx(172.0)
    assert one_gpu_seconds({"fold_seconds": 90.0, "train_seconds": 70.0}) == 90.0  # metrics from before the split


def test_the_recompilations_line():
    assert recompilations_text({"recompilations": 7}) == "7 recompilations"
    assert recompilations_text({"recompilations": 1}) == "1 recompilation"
    # TORCH_LOGS without recompiles (null), or metrics written before the count existed (no key)
    assert recompilations_text({"recompilations": None}) == recompilations_text({}) == "recompilations not counted"
