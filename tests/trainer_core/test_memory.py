from types import SimpleNamespace

import pytest

from trainer_core.memory import activation_bytes_per_token, plan_memory

GEMMA2_9B = SimpleNamespace(hidden_size=3584, intermediate_size=14336, num_attention_heads=16)
GIB = 2**30


def test_estimate_is_calibrated_against_the_h200_measurement():
    # measured: ~31 GiB of activations for batch 4 x 1024 tokens without recomputation, LoRA on 26 layers
    est = activation_bytes_per_token(GEMMA2_9B, 26, 1024, checkpointing=False) * 4 * 1024 / GIB
    assert 31 <= est <= 45
    with_ckpt = activation_bytes_per_token(GEMMA2_9B, 26, 1024, checkpointing=True) * 4 * 1024 / GIB
    assert with_ckpt < est / 10


@pytest.mark.parametrize("free_gib, ckpt, micro, accum", [
    (120, False, 4, 1),   # H200 after loading: no recomputation
    (60, False, 4, 1),    # H100 80 GB
    (14, True, 4, 1),     # a 24 GB card after ~10 GiB of weights: recompute, keep the micro-batch
    (1.5, True, 2, 2),    # very short: halve the micro-batch, double accumulation (same optimizer batch)
    (0.1, True, 1, 4),
])
def test_plan_picks_the_fastest_setting_that_fits(free_gib, ckpt, micro, accum):
    plan = plan_memory(GEMMA2_9B, n_trained_layers=26, seq_len=1024, batch_size=4, grad_accum=1,
                       free_bytes=free_gib * GIB)
    assert (plan.checkpointing, plan.micro_batch, plan.grad_accum) == (ckpt, micro, accum)
    assert plan.micro_batch * plan.grad_accum == 4


def test_fewer_trained_layers_need_less():
    a = activation_bytes_per_token(GEMMA2_9B, 26, 1024, False)
    b = activation_bytes_per_token(GEMMA2_9B, 42, 1024, False)
    assert a < b


def test_a_card_that_almost_fits_recomputes_only_as_many_layers_as_it_must():
    """A 24 GB card (about 14 GiB free after the weights) recomputes some of the 26 trained layers, not all; more
    room, fewer layers; the estimate for the chosen number fits in the room."""
    plan = plan_memory(GEMMA2_9B, n_trained_layers=26, seq_len=1024, batch_size=4, grad_accum=1, free_bytes=14 * GIB)
    assert plan.checkpointing and 0 < plan.recompute_layers < 26 and plan.micro_batch == 4
    assert plan.need_gib <= 14
    roomier = plan_memory(GEMMA2_9B, n_trained_layers=26, seq_len=1024, batch_size=4, grad_accum=1,
                          free_bytes=25 * GIB)
    assert 0 < roomier.recompute_layers < plan.recompute_layers
    tight = plan_memory(GEMMA2_9B, n_trained_layers=26, seq_len=1024, batch_size=4, grad_accum=1, free_bytes=3 * GIB)
    assert tight.recompute_layers is None and tight.checkpointing  # all layers (then smaller micro-batches)
