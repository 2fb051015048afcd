from types import SimpleNamespace

import numpy as np
import pytest

from trainer_core.model.memory import activation_bytes_per_token, plan_memory

GEMMA2_9B = SimpleNamespace(hidden_size=3584, intermediate_size=14336, num_attention_heads=16)
GIB = 2**30


H200_MEASURED_GIB = 31  # activations at batch 4 x 1024 tokens, LoRA on 26 layers, no recomputation (peak - weights)


def test_estimate_is_not_below_the_h200_measurement():
    """The planner may switch recomputation on a little early (an estimate above the measurement) but never too late:
    an estimate below what the H200 measured would skip recomputation on a card that then runs out of memory."""
    est = activation_bytes_per_token(GEMMA2_9B, 26, 1024, checkpointing=False) * 4 * 1024 / GIB
    assert est >= H200_MEASURED_GIB
    plan = plan_memory(GEMMA2_9B, n_trained_layers=26, seq_len=1024, batch_size=4, grad_accum=1,
                       free_bytes=H200_MEASURED_GIB * GIB)
    assert plan.checkpointing


def test_estimate_grows_with_layers_and_length_and_recomputation_cuts_it():
    per_token = activation_bytes_per_token
    assert per_token(GEMMA2_9B, 26, 1024, False) < per_token(GEMMA2_9B, 42, 1024, False)
    assert per_token(GEMMA2_9B, 26, 512, False) < per_token(GEMMA2_9B, 26, 1024, False)  # attention scores
    assert per_token(GEMMA2_9B, 26, 1024, True) < per_token(GEMMA2_9B, 26, 1024, False)
    assert per_token(GEMMA2_9B, 1, 1024, True) > per_token(GEMMA2_9B, 1, 1024, False)  # one layer: the recompute
    # with recomputation a trained layer keeps only its input, so more layers add little
    extra = per_token(GEMMA2_9B, 42, 1024, True) - per_token(GEMMA2_9B, 26, 1024, True)
    assert extra == 16 * 2 * GEMMA2_9B.hidden_size


def test_plan_fits_what_it_chooses_and_more_memory_is_never_slower():
    """Over free memory from 0.05 to 200 GiB: the plan fits whenever any plan can (micro-batch 1 is the floor), keeps
    the optimizer batch, and more free memory never gives a slower plan (recomputation on, or a smaller micro-batch)."""
    speed = []
    for free_gib in np.geomspace(0.05, 200, 60):
        plan = plan_memory(GEMMA2_9B, n_trained_layers=26, seq_len=1024, batch_size=8, grad_accum=2,
                           free_bytes=free_gib * GIB)
        assert plan.micro_batch * plan.grad_accum == 16
        assert plan.need_gib <= free_gib or (plan.checkpointing and plan.micro_batch == 1)
        speed.append((not plan.checkpointing, plan.micro_batch))
    assert speed == sorted(speed) and speed[0] == (False, 1) and speed[-1] == (True, 8)


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


def test_auto_eval_batch_is_the_largest_power_of_two_that_fits_and_grows_with_free_memory():
    """train.eval_batch_size=auto: a power of two up to 64, never more than the free memory holds (estimate with
    headroom), never less as free memory grows; inference keeps one layer's activations, so far below training's."""
    from trainer_core.model.memory import SAFETY, eval_batch_size, inference_bytes_per_token

    per_row = inference_bytes_per_token(GEMMA2_9B, 1024) * 1024 * SAFETY
    assert per_row < activation_bytes_per_token(GEMMA2_9B, 26, 1024, checkpointing=False) * 1024 / 10
    sizes = [eval_batch_size(GEMMA2_9B, seq_len=1024, free_bytes=gib * GIB) for gib in (0, 0.1, 1, 4, 10, 40, 500)]
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] == 64
    for gib, b in zip((0.1, 1, 4, 10, 40), sizes[1:-1]):
        assert b & (b - 1) == 0  # a power of two
        assert b == 1 or b * per_row <= gib * GIB  # fits
        assert b == 64 or 2 * b * per_row > gib * GIB  # the next one would not
    assert eval_batch_size(GEMMA2_9B, seq_len=1024, free_bytes=40 * GIB, cap=16) == 16
    # pairwise rows hold two sequences: half the rows; shorter rows: more of them
    assert eval_batch_size(GEMMA2_9B, seq_len=1024, free_bytes=10 * GIB, seqs_per_row=2) == sizes[4] // 2
    assert eval_batch_size(GEMMA2_9B, seq_len=256, free_bytes=10 * GIB) > sizes[4]


def test_eval_batch_setting_resolves_to_rows():
    """An integer stays as given; auto off the GPU is the training micro-batch."""
    import torch

    from trainer_core.fold.inference import resolve_eval_batch_size

    cpu = torch.device("cpu")
    assert resolve_eval_batch_size(8, None, [[1, 2]], cpu, train_batch=4) == 8
    assert resolve_eval_batch_size("auto", None, [[1, 2]], cpu, train_batch=4) == 4
