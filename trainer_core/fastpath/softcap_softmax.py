"""The soft-capped, masked softmax of Gemma-2 attention as one kernel forward and one backward (Triton, on CUDA).

``softmax(softcap * tanh(scores * scaling / softcap) + mask)`` for bf16 scores straight out of the ``Q K^T`` matmul:
read the scores and the mask once, write bf16 probabilities once (what the ``P V`` matmul reads). The backward pass
recomputes the probabilities from the saved scores (cheap arithmetic instead of a saved fp32 tensor) and writes the
scores' gradient. torch.compile's own kernel for the same chain took 274 µs a layer on an H200 (docs/PERFORMANCE.md,
session 5 profile), several times what reading the scores and writing the probabilities once costs; with these
kernels the whole step was 1.01x faster (block_causal_triton against block_causal, same process). Session 6, once the
mask no longer made each step wait for the previous one, measured the opposite: block_causal 1.02x; each call of these
ops costs about 0.1 ms of host time (264 calls a step), more than their kernels save (docs/PERFORMANCE.md).

The numbers are those of the plain chain computed in fp32, which is what the compiled eager path computes too:
:func:`reference` (and :func:`reference_backward`) is the same function in plain torch, used on the CPU, without
Triton, and for rows longer than ``MAX_KEYS``. Used by ``model.attn_implementation=block_causal_triton``
(:mod:`trainer_core.fastpath.attention`). The ops are torch custom ops (``trainer_core::softcap_softmax``), opaque to
torch.compile, defined by :func:`define_ops` before a model is built, never at import.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

MAX_KEYS = 16384  # one row per Triton program: the row must fit in one block


def reference(scores: torch.Tensor, mask: torch.Tensor, scaling: float, softcap: float) -> torch.Tensor:
    """scores (B, H, R, E), mask (B, 1, R, E) additive; softcap 0 = none. Probabilities in the scores' dtype."""
    x = scores.float() * scaling
    if softcap:
        x = torch.tanh(x / softcap) * softcap
    return torch.softmax(x + mask.float(), dim=-1).to(scores.dtype)


def reference_backward(grad: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, scaling: float,
                       softcap: float) -> torch.Tensor:
    """The gradient of :func:`reference` with respect to the scores, for ``grad`` on its output."""
    x = scores.float() * scaling
    capped = torch.tanh(x / softcap) if softcap else None
    p = torch.softmax((capped * softcap if softcap else x) + mask.float(), dim=-1)
    g = grad.float()
    dy = p * (g - (g * p).sum(-1, keepdim=True))
    if softcap:
        dy = dy * (1 - capped * capped)
    return (dy * scaling).to(scores.dtype)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _launch(kernel_name: str, inputs: list[torch.Tensor], mask: torch.Tensor, scaling: float,
            softcap: float) -> torch.Tensor:
    """Run ``softcap_triton.<kernel_name>`` over every row; ``inputs`` end with the scores, the output is shaped like
    them (probabilities forward, the scores' gradient backward)."""
    import triton

    from trainer_core.fastpath import softcap_triton
    inputs = [t.contiguous() for t in inputs]
    scores = inputs[-1]
    out = torch.empty_like(scores)
    batch, heads, rows, length = scores.shape
    block = triton.next_power_of_2(length)
    getattr(softcap_triton, kernel_name)[(batch * heads * rows,)](
        *inputs, mask, out, length, heads * rows, rows, mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(2),
        scaling, softcap or 1.0, HAS_CAP=bool(softcap), BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return out


def _use_triton(scores: torch.Tensor, mask: torch.Tensor) -> bool:
    return (scores.is_cuda and scores.shape[-1] <= MAX_KEYS and mask.stride(-1) == 1 and mask.shape[1] == 1
            and triton_available())


@functools.cache
def define_ops() -> None:
    """Define the custom ops (once per process; ``trainer_core.fastpath.attention.register`` calls this before any
    model is
    built, so torch.compile only ever sees ``torch.ops.trainer_core.softcap_softmax``)."""
    @torch.library.custom_op("trainer_core::softcap_softmax", mutates_args=())
    def forward(scores: torch.Tensor, mask: torch.Tensor, scaling: float, softcap: float) -> torch.Tensor:
        if not _use_triton(scores, mask):
            return reference(scores, mask, scaling, softcap)
        return _launch("forward", [scores], mask, scaling, softcap)

    @torch.library.custom_op("trainer_core::softcap_softmax_backward", mutates_args=())
    def backward(grad: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, scaling: float,
                 softcap: float) -> torch.Tensor:
        if not _use_triton(scores, mask):
            return reference_backward(grad, scores, mask, scaling, softcap)
        return _launch("backward", [grad, scores], mask, scaling, softcap)

    forward.register_fake(lambda scores, mask, scaling, softcap: torch.empty_like(scores))
    backward.register_fake(lambda grad, scores, mask, scaling, softcap: torch.empty_like(scores))

    def setup_context(ctx, inputs, output) -> None:
        scores, mask, ctx.scaling, ctx.softcap = inputs
        ctx.save_for_backward(scores, mask)

    def grad_fn(ctx, grad):
        scores, mask = ctx.saved_tensors
        return backward(grad, scores, mask, ctx.scaling, ctx.softcap), None, None, None

    forward.register_autograd(grad_fn, setup_context=setup_context)


def softcap_softmax(scores: torch.Tensor, mask: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
    """scores (B, H, R, E), mask (B, 1, R, E) additive (a view of transformers' eager mask); softcap None = none.
    Returns the probabilities in the scores' dtype; differentiable with respect to the scores."""
    return torch.ops.trainer_core.softcap_softmax(scores, mask, float(scaling), float(softcap or 0.0))
