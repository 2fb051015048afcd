"""Choose recomputation and micro-batch size from the GPU's free memory (``model.gradient_checkpointing: auto``).

Activation memory is estimated from the architecture, per token and per trained decoder layer (only layers at or
above ``freeze_layers`` keep activations for backward once no gradient flows below them):

- without recomputation: ``2 bytes * (16 * hidden + 4 * intermediate)`` for the saved bf16 tensors of the
  projections, norms and MLP, plus eager attention's ``heads * seq_len * 8`` bytes (fp32 scores, bf16 softmax);
- with recomputation: each trained layer keeps only its bf16 input (``2 * hidden``), plus one layer's full set
  during its recompute;
- with recomputation of only the lowest ``k`` trained layers (the rest keep their activations): ``k`` inputs, the
  other layers' full sets and one full set for the recompute. The plan recomputes as few layers as fit.

Calibration (one H200, Gemma-2 9B nf4, LoRA on layers 16-41, batch 4 x 1024 tokens): the estimate gives 38 GiB
of activations without recomputation where about 31 GiB were measured (40 GiB peak minus ~9 GiB of weights), so it
errs on the safe side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SAFETY = 1.10  # headroom for allocator fragmentation and the optimizer's temporaries


@dataclass
class MemoryPlan:
    checkpointing: bool
    micro_batch: int
    grad_accum: int
    free_gib: float
    need_gib: float
    reason: str
    recompute_layers: int | None = None  # trained layers recomputed, lowest first (None: all when checkpointing)


def activation_bytes_per_token(config, n_trained_layers: int, seq_len: int, checkpointing: bool,
                               recompute_layers: int | None = None) -> float:
    """Activation bytes kept per token: see the module doc (``recompute_layers``: only that many layers recomputed)."""
    h = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * h)
    heads = config.num_attention_heads
    full_layer = 2 * (16 * h + 4 * inter) + heads * seq_len * 8
    if not checkpointing:
        return n_trained_layers * full_layer
    k = n_trained_layers if recompute_layers is None else min(recompute_layers, n_trained_layers)
    return k * 2 * h + (n_trained_layers - k) * full_layer + full_layer


def plan_memory(config, *, n_trained_layers: int, seq_len: int, batch_size: int, grad_accum: int,
                free_bytes: float) -> MemoryPlan:
    """The fastest setting that fits: no recomputation at the configured micro-batch if possible, else recomputation
    of as few of the trained layers as fit, else recomputation of all of them with the micro-batch halved (grad_accum
    doubled, so the optimizer sees the same batch)."""
    free_gib = free_bytes / 2**30

    def need(ckpt: bool, micro: int) -> float:
        return activation_bytes_per_token(config, n_trained_layers, seq_len, ckpt) * micro * seq_len * SAFETY / 2**30

    if need(False, batch_size) <= free_gib:
        return MemoryPlan(False, batch_size, grad_accum, free_gib, need(False, batch_size),
                          "activations fit without recomputation")
    for k in range(1, n_trained_layers):  # recompute as few layers as fit (the lowest trained ones)
        partial = activation_bytes_per_token(config, n_trained_layers, seq_len, True, k)
        if partial * batch_size * seq_len * SAFETY / 2**30 <= free_gib:
            return MemoryPlan(True, batch_size, grad_accum, free_gib, partial * batch_size * seq_len * SAFETY / 2**30,
                              f"recomputation of {k} of {n_trained_layers} trained layers", k)
    micro, accum = batch_size, grad_accum
    while micro > 1 and need(True, micro) > free_gib:
        micro, accum = (micro + 1) // 2, accum * 2
    return MemoryPlan(True, micro, accum, free_gib, need(True, micro),
                      "recomputation on" + (f", micro-batch {micro} x {accum} accumulation" if micro < batch_size
                                            else ""))


EVAL_BATCH_CAP = 64  # train.eval_batch_size=auto never goes past this (longer batches gain little on a busy GPU)


def inference_bytes_per_token(config, seq_len: int) -> float:
    """Activation bytes per token of a forward pass without grad: nothing is kept for a backward pass, so only one
    decoder layer's tensors live at a time (the no-recomputation set of one layer, attention scores included) beside
    the residual stream and its normed copies (fp32 after peft's k-bit preparation: ``4 * 4 * hidden``)."""
    return activation_bytes_per_token(config, 1, seq_len, False) + 16 * config.hidden_size


def inference_batch_bytes(config, *, seq_len: int, rows: int, seqs_per_row: int = 1) -> float:
    """Bytes a forward pass without grad over ``rows`` rows of ``seq_len`` tokens per sequence needs (``seqs_per_row``
    sequences per row: 2 for the pairwise head), with :data:`SAFETY` headroom."""
    return inference_bytes_per_token(config, seq_len) * seq_len * rows * seqs_per_row * SAFETY


def eval_batch_size(config, *, seq_len: int, free_bytes: float, seqs_per_row: int = 1,
                    cap: int = EVAL_BATCH_CAP) -> int:
    """``train.eval_batch_size=auto`` on a GPU: the largest power of two up to ``cap`` whose inference activations
    (``seq_len`` tokens per sequence, ``seqs_per_row`` sequences per row: 2 for the pairwise head, with
    :data:`SAFETY` headroom) fit in ``free_bytes``; 1 when not even that fits (prediction then runs as it can)."""
    per_row = inference_batch_bytes(config, seq_len=seq_len, rows=1, seqs_per_row=seqs_per_row)
    batch = 1
    while batch * 2 <= cap and batch * 2 * per_row <= free_bytes:
        batch *= 2
    return batch


def apply_budget(device: torch.device, budget_gib: float | None) -> None:
    """Cap this process's GPU memory at ``budget_gib`` (emulates a smaller card, or shares one)."""
    if device.type == "cuda" and budget_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * 2**30 / total), device)


def free_device_bytes(device: torch.device, budget_gib: float | None = None) -> float:
    """Bytes this process can still allocate on ``device``, within ``budget_gib`` if given."""
    if device.type != "cuda":
        return float("inf")
    free, _ = torch.cuda.mem_get_info(device)
    if budget_gib:
        free = min(free, budget_gib * 2**30 - torch.cuda.memory_reserved(device))
    return float(free)


def recomputed_layers(cfg, plan: MemoryPlan) -> range | None:
    """The decoder layers a plan recomputes: the lowest ``plan.recompute_layers`` trained ones (None: all)."""
    if plan.recompute_layers is None:
        return None
    first = cfg.lora.freeze_layers
    return range(first, first + plan.recompute_layers)
