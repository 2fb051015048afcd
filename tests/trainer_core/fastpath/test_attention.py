"""model.attn_implementation=block_causal (and block_causal_triton) against eager on the tiny nf4 Gemma-2 (GQA: 4
query heads on 2 key/value heads, soft-capping, a sliding-window layer) with LoRA on q/k/v, fp32 on the CPU: the same
logits, loss and LoRA gradients, eager and compiled, on padded rows, with blocks that do and do not divide the length;
the fused soft-capped softmax's backward against autograd, and its Triton kernels against it on a GPU."""

import pytest
import torch

from tests.conftest import CONFIGS
from tests.trainer_core.fastpath.test_last_layer import assert_same
from tests.trainer_core.fastpath.test_last_layer import run as run_layers
from trainer_core.config import ConfigError, load_config, validate
from trainer_core.fastpath import attention, softcap_softmax


def run(attn: str, compile: str = "off", pooled: bool = False, checkpointing: str = "off"):
    """(logits, loss, LoRA/head gradients by name, the model) of one batch of 64-token rows, fp32, LoRA dropout 0."""
    return run_layers(pooled, compile=compile, checkpointing=checkpointing, attn=attn)


@pytest.fixture
def counted(monkeypatch):
    """Counts the query blocks block_causal_attention computes (so a test cannot pass with eager running instead)."""
    calls = []
    real = attention.block_causal_attention

    def counting(module, query, *args, **kwargs):
        calls.append(-(-query.shape[2] // attention.BLOCK))
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(attention, "block_causal_attention", counting)
    return calls


@pytest.mark.parametrize("name", ["block_causal", "block_causal_triton"])
@pytest.mark.parametrize("block", [16, 24, 64])  # 4 blocks, 3 uneven ones (24 + 24 + 16), one block
def test_block_causal_gives_eager_logits_loss_and_gradients(monkeypatch, counted, block, name):
    monkeypatch.setattr(attention, "BLOCK", block)
    assert_same(run("eager"), run(name))
    assert counted and set(counted) == {-(-64 // block)}  # every layer, forward, in blocks


@pytest.mark.parametrize("name", ["block_causal", "block_causal_triton"])
def test_block_causal_with_recomputation_and_the_pooled_last_layer(monkeypatch, counted, name):
    monkeypatch.setattr(attention, "BLOCK", 16)
    assert_same(run("eager"), run(name, pooled=True, checkpointing="on"))
    assert counted


@pytest.mark.slow  # torch.compile on the CPU
@pytest.mark.parametrize("name", ["block_causal", "block_causal_triton"])
def test_block_causal_compiled_matches_eager(monkeypatch, name):
    monkeypatch.setattr(attention, "BLOCK", 24)
    torch._dynamo.reset()
    assert_same(run("eager"), run(name, compile="on"), grad_tol=(1e-4, 1e-6))


def scores_and_mask(device: str, dtype: torch.dtype):
    """Scores (2, 4, 5, 12) of a 12-key block, and its rows of a padded causal mask (transformers' eager form)."""
    gen = torch.Generator().manual_seed(0)
    scores = (torch.randn(2, 4, 5, 12, generator=gen) * 20).to(device, dtype)
    full = torch.zeros(2, 1, 12, 12)
    full[..., 9:] = torch.finfo(torch.float32).min  # keys past the queries (causality)
    full[1, ..., :3] = torch.finfo(torch.float32).min  # left padding of row 1
    grad = torch.randn(2, 4, 5, 12, generator=gen).to(device, dtype)
    return scores, full[:, :, 7:12].to(device), grad


@pytest.mark.parametrize("softcap", [50.0, None])
def test_softcap_softmax_reference_backward_is_the_autograd_gradient(softcap):
    scores, mask, grad = scores_and_mask("cpu", torch.float32)
    leaf = scores.clone().requires_grad_()
    x = leaf * 0.3
    x = torch.tanh(x / softcap) * softcap if softcap else x
    torch.softmax(x + mask, -1).backward(grad)
    ours = softcap_softmax.reference_backward(grad, scores, mask, 0.3, softcap or 0.0)
    torch.testing.assert_close(ours, leaf.grad, rtol=1e-5, atol=1e-6)  # measured: within 8e-8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not softcap_softmax.triton_available(),
                    reason="the Triton kernels run on CUDA only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap_softmax_triton_kernels_give_the_reference_numbers(dtype):
    scores, mask, grad = scores_and_mask("cuda", dtype)
    leaf = scores.clone().requires_grad_()
    softcap_softmax.define_ops()
    probs = softcap_softmax.softcap_softmax(leaf, mask, 0.3, 50.0)
    probs.backward(grad)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=4e-3)  # one bf16 ulp
    torch.testing.assert_close(probs, softcap_softmax.reference(scores, mask, 0.3, 50.0), **tol)
    torch.testing.assert_close(leaf.grad, softcap_softmax.reference_backward(grad, scores, mask, 0.3, 50.0), **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not softcap_softmax.triton_available(),
                    reason="the Triton kernels run on CUDA only")
def test_softcap_softmax_triton_kernels_compiled_on_a_mask_view_give_the_reference_numbers():
    """Inside torch.compile, with the mask a view of a larger graph input (as block_causal passes each block's rows of
    transformers' mask), forward and backward."""
    scores, mask, grad = scores_and_mask("cuda", torch.float32)
    full = torch.zeros(2, 1, 12, 12, device="cuda")
    full[:, :, 7:12] = mask
    leaf = scores.clone().requires_grad_()
    softcap_softmax.define_ops()
    torch._dynamo.reset()
    step = torch.compile(lambda s, m: softcap_softmax.softcap_softmax(s, m[:, :, 7:12], 0.3, 50.0) * 2, fullgraph=True)
    probs = step(leaf, full)
    probs.backward(grad)
    torch.testing.assert_close(probs, 2 * softcap_softmax.reference(scores, mask, 0.3, 50.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad, 2 * softcap_softmax.reference_backward(grad, scores, mask, 0.3, 50.0),
                               rtol=1e-5, atol=1e-6)


def mask_kwargs(device: str, pass_device: bool = True) -> dict:
    """Arguments of transformers' mask functions for 2 rows of 10 tokens, row 1 left-padded by 3, as its
    ``create_causal_mask`` passes them (``device`` included; ``pass_device=False``: a caller that leaves it out)."""
    padding = torch.ones(2, 10, dtype=torch.bool, device=device)
    padding[1, :3] = False
    kwargs = dict(batch_size=2, q_length=10, kv_length=10, attention_mask=padding, dtype=torch.float32)
    return {**kwargs, "device": device} if pass_device else kwargs


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("pass_device", [True, False])
def test_additive_mask_is_transformers_eager_mask(window, pass_device):
    from transformers.masking_utils import eager_mask, sliding_window_causal_mask_function

    kwargs = mask_kwargs("cpu", pass_device)
    if window:
        kwargs["mask_function"] = sliding_window_causal_mask_function(window)
    ours = attention.additive_mask(**kwargs)
    assert ours.shape == (2, 1, 10, 10) and (ours == 0).sum() < 100  # a causal, padded mask
    torch.testing.assert_close(ours, eager_mask(**kwargs), rtol=0, atol=0)


def test_additive_mask_with_offsets_and_a_short_padding_mask_is_transformers_eager_mask():
    """Queries 6..9 over keys 2..11 of a 2-D mask of 10 (keys past its end count as padding, as transformers has it)."""
    from transformers.masking_utils import eager_mask

    kwargs = {**mask_kwargs("cpu"), "q_length": 4, "q_offset": 6, "kv_offset": 2}
    torch.testing.assert_close(attention.additive_mask(**kwargs), eager_mask(**kwargs), rtol=0, atol=0)


def test_additive_mask_is_built_where_the_padding_mask_lives():
    """No tensor crosses devices: with the padding mask on the meta device (no data, so any copy to or from it
    raises) and no ``device`` given, the mask is built on meta. transformers' ``sdpa_mask`` made its indices on the CPU
    here, the copy that synchronized with the card on CUDA."""
    mask = attention.additive_mask(**mask_kwargs("meta", pass_device=False))
    assert mask.device.type == "meta" and mask.shape == (2, 1, 10, 10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist on CUDA only")
@pytest.mark.parametrize("pass_device", [True, False])
def test_additive_mask_does_not_wait_for_the_card(pass_device):
    from transformers.masking_utils import eager_mask, sliding_window_causal_mask_function

    kwargs = {**mask_kwargs("cuda", pass_device), "mask_function": sliding_window_causal_mask_function(4)}
    torch.cuda.set_sync_debug_mode("error")
    try:
        mask = attention.additive_mask(**kwargs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert mask.is_cuda
    torch.testing.assert_close(mask, eager_mask(**{**kwargs, "device": "cuda"}), rtol=0, atol=0)


def test_block_causal_is_refused_for_an_encoder_head():
    cfg = load_config(CONFIGS / "smoke.yaml", ["model.attn_implementation=block_causal", "model.head=pairwise",
                                               "lora.enabled=false", "model.quantization=none"])
    with pytest.raises(ConfigError, match="block_causal skips the keys a causal decoder masks"):
        validate(cfg)


def test_block_causal_refuses_a_bidirectional_attention_layer():
    class EncoderAttention(torch.nn.Module):
        is_causal = False

    model = torch.nn.Sequential(EncoderAttention())
    with pytest.raises(ValueError, match="serves causal decoders only"):
        attention.check_causal(model)
