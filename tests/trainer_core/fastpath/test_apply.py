"""fastpath.apply's side effects: process-wide settings made once and idempotently, the model's own hooks and class
swaps undone by release (predict and tune build several models in one process)."""

import pytest
import torch
from torch._inductor.choices import InductorChoices
from torch._inductor.virtualized import V
from transformers import AttentionInterface

from tests.conftest import CONFIGS
from tests.trainer_core.fastpath.fast_model import build_fast
from tests.trainer_core.fastpath.test_last_layer import batch
from trainer_core import fastpath
from trainer_core.config import load_config, validate
from trainer_core.fastpath import attention, last_layer
from trainer_core.fastpath.lora_dropout import SharedDropout
from trainer_core.model.build import build_model, decoder_layers, load_trainable_state_dict, trainable_state_dict

FAST = ["model.compile=on", "model.pooled_last_layer=true", "model.attn_implementation=block_causal",
        "lora.shared_dropout=true", "lora.dropout=0.3", "model.persistent_reduction_max=1024",
        "model.gradient_checkpointing=on"]


def fast_cfg(*extra: str):
    cfg = load_config(CONFIGS / "smoke.yaml", [*FAST, *extra])
    validate(cfg)
    return cfg


def global_state() -> dict:
    return {"recompile_limit": torch._dynamo.config.cache_size_limit, "choices": V.choices,
            "attention": AttentionInterface()[attention.NAME], "op": torch.ops.trainer_core.softcap_softmax}


@pytest.fixture
def inductor_rule():
    yield
    V.set_choices_handler(InductorChoices())  # persistent_reduction_max is a thread-wide choice: leave torch's


def test_process_wide_settings_are_made_once(inductor_rule):
    """A second model changes no process-wide setting the first one made (same objects, not equal copies), and the
    recompile limit is only ever raised."""
    first = build_fast(fast_cfg())
    after_first = global_state()
    assert after_first["recompile_limit"] >= 64 and after_first["choices"].limit == 1024
    second = build_fast(fast_cfg())
    after_second = global_state()
    assert all(after_second[k] is after_first[k] for k in after_first if k != "recompile_limit")
    assert after_second["recompile_limit"] == after_first["recompile_limit"]
    assert type(decoder_layers(first)[-1]) is type(decoder_layers(second)[-1])  # one pooled class per layer class
    torch._dynamo.config.cache_size_limit = 500
    try:
        build_fast(fast_cfg())
        assert torch._dynamo.config.cache_size_limit == 500
    finally:
        torch._dynamo.config.cache_size_limit = after_first["recompile_limit"]


def test_release_removes_the_hooks_and_class_swaps(monkeypatch, inductor_rule):
    """After release: no hook of the fast path runs (pooled positions, dropout draws), the top layer has its own class
    again, peft's dropouts are back, and the model computes the plain model's logits; releasing twice is harmless, and
    the fast path can be applied again only after a release."""
    cfg = fast_cfg("model.compile=off", "model.persistent_reduction_max=0")
    model = build_fast(cfg)
    plain = build_fast(fast_cfg("model.compile=off", "model.persistent_reduction_max=0",
                                "model.pooled_last_layer=false", "lora.shared_dropout=false"))
    with torch.no_grad():  # LoRA B starts at zero: give it values so the adapters matter, the same in both models
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    load_trainable_state_dict(plain, trainable_state_dict(model))  # the base weights are the same random ones
    positions, draws = [], []
    real_positions, real_randint = last_layer.pooled_positions, torch.randint
    monkeypatch.setattr(last_layer, "pooled_positions", lambda *a: positions.append(1) or real_positions(*a))
    monkeypatch.setattr(torch, "randint", lambda *a, **k: draws.append(1) or real_randint(*a, **k))
    input_ids, mask, _ = batch()
    top = decoder_layers(model)[-1]
    model.train()
    model(input_ids=input_ids, attention_mask=mask)
    assert positions and draws and isinstance(top, last_layer.PooledLastLayer)
    with pytest.raises(RuntimeError, match="already has the fast path"):
        fastpath.apply(model, cfg, fastpath.place(cfg, model, device=torch.device("cpu"), precision="fp32",
                                                  seq_len=64, micro_batch=4))

    fastpath.release(model)
    fastpath.release(model)
    positions.clear(), draws.clear()
    model(input_ids=input_ids, attention_mask=mask)
    assert positions == [] and draws == []
    assert type(top) is type(decoder_layers(plain)[-1]) and "pooled_index" not in vars(top)
    assert not any(isinstance(m, SharedDropout) for m in model.modules())
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids, attention_mask=mask).logits,
                                   plain(input_ids=input_ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-6)
    speed = fastpath.apply(model, cfg, fastpath.place(cfg, model, device=torch.device("cpu"), precision="fp32",
                                                      seq_len=64, micro_batch=4))
    assert isinstance(decoder_layers(model)[-1], last_layer.PooledLastLayer) and not speed.released


def test_the_steps_in_their_order():
    """apply reports what it did, in the documented order; a model placed for prediction gets the weight cache (beside
    its inference batch) and the dropout sharing (the identity in evaluation, as in the fold) but no recomputation."""
    cfg = fast_cfg("model.dequant_cache=on", "model.compile=off", "model.persistent_reduction_max=0")
    model = build_fast(cfg)
    speed = vars(model)["trainer_core_fastpath"]
    assert list(speed.steps) == ["dequant_cache", "pooled_last_layer", "attention", "shared_dropout", "recompute"]
    assert speed.cache_note == "dequantized weights cached: 4/4 layers (0.0 GiB)"
    fastpath.release(model)
    fresh = build_model(cfg.model, cfg.lora, pad_token_id=0, precision="fp32", device=torch.device("cpu"))
    placement = fastpath.place(cfg, fresh, device=torch.device("cpu"), precision="fp32", seq_len=64, micro_batch=4,
                               training=False)
    assert placement.recompute == "off"
    speed = fastpath.apply(fresh, cfg, placement)
    assert list(speed.steps) == ["dequant_cache", "pooled_last_layer", "attention", "shared_dropout"]  # the identity
    assert speed.cache_note == "dequantized weights cached: 4/4 layers (0.0 GiB)"
    fastpath.release(fresh)
