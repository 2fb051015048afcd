"""Checkpoints hold tensors and JSON only: a file holding a pickled object (planted in a shared run directory) is
refused without running it, and every RNG a resumed fold draws from (Python, NumPy, torch CPU and CUDA) round-trips
through JSON."""

import json
import random

import numpy as np
import pytest
import torch

from trainer_core.fold.state import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state


class Planted:
    """Unpickling this calls open(path, "w"): a stand-in for any code a planted checkpoint could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def tiny_checkpoint(path):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu")
    path.mkdir()
    save_checkpoint(path, model, optimizer, scaler, 7, "fp", {"samples": 3}, [rng_state(torch.device("cpu"))])
    return model, optimizer, scaler


def test_a_checkpoint_round_trips_from_tensors_and_json(tmp_path):
    model, optimizer, scaler = tiny_checkpoint(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"trainable.pt", "optimizer.pt", "scaler.pt",
                                                               "rng.json", "state.json"}
    assert load_checkpoint(tmp_path / "ckpt", model, optimizer, scaler, "fp") == (7, {"samples": 3})


@pytest.mark.parametrize("name", ["trainable.pt", "optimizer.pt", "scaler.pt"])
def test_a_checkpoint_holding_a_pickled_object_is_refused_unrun(tmp_path, name):
    model, optimizer, scaler = tiny_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "ran"
    torch.save({"state": Planted(marker)}, tmp_path / "ckpt" / name)
    with pytest.raises(CheckpointError, match=rf"{name} holds pickled Python objects \((_?io|builtins)\.open\), .*"
                                              r"refusing to load it \(loading could run code\)"):
        load_checkpoint(tmp_path / "ckpt", model, optimizer, scaler, "fp")
    assert not marker.exists()
    torch.load(tmp_path / "ckpt" / name, weights_only=False)  # what an unguarded load does: runs the planted code
    assert marker.exists()


def test_a_checkpoint_with_a_pickled_rng_file_is_refused(tmp_path):
    """The format before this one pickled NumPy's RNG state (rng.pt): refused, with what to do."""
    model, optimizer, scaler = tiny_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "rng.json").unlink()
    torch.save({"numpy": np.random.get_state()}, tmp_path / "ckpt" / "rng.pt")
    with pytest.raises(CheckpointError, match="has no rng.json .*delete it to train the fold from its start"):
        load_checkpoint(tmp_path / "ckpt", model, optimizer, scaler, "fp")


def draws(device):
    return (random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.randn(1, device=device)))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_every_rng_round_trips_through_json(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    torch.manual_seed(3)
    saved = json.loads(json.dumps(rng_state(device)))
    first = draws(device)
    torch.manual_seed(4)  # moves every torch generator, CUDA's included
    random.seed(4)
    np.random.seed(4)
    assert draws(device) != first
    set_rng_state(saved, device)
    assert draws(device) == first


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resume_on_a_gpu_matches_an_uninterrupted_run(tmp_path):
    """Dropout on a GPU draws from the CUDA generator: its state travels in the checkpoint, so a fold resumed on a GPU
    ends where an uninterrupted one does; resumed without it (as before), the masks and the model differ."""
    import shutil

    from tests.conftest import CONFIGS, DATA
    from trainer_core.config import load_config
    from trainer_core.data.arena import assign_folds, load_rows
    from trainer_core.fold.loop import train_fold

    cfg = load_config(CONFIGS / "smoke.yaml", [
        "data.max_rows=60", "data.max_length=64", "model.quantization=none", "train.optimizer=adamw",
        "train.precision=fp32", "lora.dropout=0.3", "train.max_steps=4", "train.checkpoint_every=2",
        "train.log_every=100"])
    rows = assign_folds(load_rows(DATA, max_rows=60), 5)
    gpu, saved = torch.device("cuda", 0), {}

    def keep(m, ckpt):
        if ckpt is not None:
            saved[m["step"]] = shutil.copytree(ckpt, tmp_path / f"ckpt{m['step']}")

    def probs(result):
        return result.oof[["p_a", "p_b", "p_tie"]].to_numpy()

    full = train_fold(cfg, 0, rows, tmp_path / "a", report=keep, device=gpu)
    resumed = train_fold(cfg, 0, rows, tmp_path / "b", resume_from=saved[2], device=gpu)
    np.testing.assert_allclose(probs(resumed), probs(full), rtol=1e-5, atol=1e-6)
    rng = json.loads((saved[2] / "rng.json").read_text())
    del rng["ranks"][0]["cuda"]
    (saved[2] / "rng.json").write_text(json.dumps(rng))
    without_cuda_rng = train_fold(cfg, 0, rows, tmp_path / "c", resume_from=saved[2], device=gpu)
    assert np.abs(probs(without_cuda_rng) - probs(full)).max() > 1e-4
