"""fp8 matmuls through frozen linear layers, two opt-ins that change the numbers, never the default: the activation
gradient of training (``model.fp8_backward``) and the forward pass of prediction (``model.fp8_predict``).

A frozen linear layer ``y = x @ W.T`` trains nothing of its own, but the backward pass still computes
``grad_x = grad_y @ W`` to carry the gradient down to the adapters below it. With ``model.fp8_backward`` that one
matmul runs in fp8 in the layers :mod:`trainer_core.fastpath.dequant_cache` holds: ``grad_y`` is quantized row by row to
float8_e4m3fn (scale = row amax / 448), ``W`` once (it is frozen) to float8_e4m3fn with one scale per column of ``W``
(per column of ``grad_x``), and ``torch._scaled_mm`` multiplies them with fp32 accumulation into bf16 on CUDA devices
of compute capability >= 8.9. Elsewhere (the CPU, older GPUs, or a non-bf16 gradient) the same quantize -> dequantize
rounding is emulated and multiplied in fp32, so CPU tests see the numbers the GPU path computes (up to the order of
the fp32 sums). The forward pass is untouched: the plain ``F.linear``, bit for bit.

Why e4m3 and not e5m2 for ``grad_y``: e5m2's wider range is what per-tensor scaling needs for heavy-tailed gradients;
with one scale per row, e4m3 still spans 17 binades below each row's amax (only values under 2^-17 of their row's
largest flush to zero), and its extra mantissa bit halves the rounding step: on a test matrix with channels spread
over four decades, 3.5% relative error of ``grad_x`` against 5.0% with e5m2
(``tests/trainer_core/fastpath/test_fp8.py``).

``model.fp8_predict`` (:class:`Fp8Linear`): a model loaded only to predict (``orchestrator.predict``) keeps its frozen
linear layers as e4m3 weights with one scale per output feature (1 byte a weight, half of bf16), and each call
quantizes its input row by row (one scale per token) and multiplies with ``torch._scaled_mm``, twice bf16's tensor
throughput on an H100. Both operands are row-scaled, the recipe of fp8 inference kernels; the LoRA adapters, norms,
attention and the head stay in the compute dtype. Training and a fold's own held-out rows never use it, so a fold's
out-of-fold log loss is always the exact model's; how far fp8 moves the probabilities is in docs/QUALITY.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
AMAX_FLOOR = 1e-12  # an all-zero row gets a tiny scale instead of a division by zero (its values stay 0)


def quantize_rows(t: torch.Tensor, dtype: torch.dtype, fp8_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) with ``q * scale ~ t``: ``t`` (rows, cols) in ``dtype`` (row-major), scale (rows, 1) fp32 with
    scale = row amax / fp8_max, so each row's largest value lands on the format's largest."""
    t = t.float()
    scale = t.abs().amax(dim=1, keepdim=True).clamp(min=AMAX_FLOOR) / fp8_max
    q = (t / scale).clamp(-fp8_max, fp8_max).to(dtype).contiguous()
    return q, scale.contiguous()


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A frozen ``weight`` (out, in) for :func:`grad_input`: W.T quantized row-wise to e4m3 (in, out), row-major
    (``.t()`` of it is the column-major second operand ``_scaled_mm`` wants), and its scales as (1, in)."""
    q, scale = quantize_rows(weight.detach().t(), torch.float8_e4m3fn, E4M3_MAX)
    return q, scale.reshape(1, -1).contiguous()


def shapes_fit(out_features: int, in_features: int) -> bool:
    """``_scaled_mm`` needs both dimensions of its second operand (here W: out x in) to be multiples of 16; layers
    that do not fit keep the bf16 backward (on every device, so the CPU computes what a GPU would)."""
    return out_features % 16 == 0 and in_features % 16 == 0


def scaled_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._scaled_mm`` row-wise fp8 runs for weights of ``dtype`` on ``device`` (else: emulation)."""
    return (device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device) >= (8, 9))


def grad_input(grad_y: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, use_scaled_mm: bool) -> torch.Tensor:
    """``grad_y @ W`` in fp8: grad_y (..., out) row-scaled to e4m3, W as :func:`quantize_weight` stores it."""
    lead, n_out = grad_y.shape[:-1], grad_y.shape[-1]
    g_q, g_scale = quantize_rows(grad_y.reshape(-1, n_out), torch.float8_e4m3fn, E4M3_MAX)
    if use_scaled_mm and grad_y.dtype == torch.bfloat16 and g_q.shape[0] > 0:
        out = torch._scaled_mm(g_q, w_q.t(), scale_a=g_scale, scale_b=w_scale, out_dtype=torch.bfloat16)
    else:  # the same rounding, dequantized and multiplied in fp32
        out = ((g_q.float() * g_scale) @ (w_q.float() * w_scale.t()).t()).to(grad_y.dtype)
    return out.reshape(*lead, w_q.shape[0])


def linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
           use_scaled_mm: bool) -> torch.Tensor:
    """``x @ W.T + bias`` in fp8: x (..., in) row-scaled to e4m3 at each call, W (out, in) as :class:`Fp8Linear` keeps
    it (e4m3, scales (1, out)). The result in x's dtype."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    x_q, x_scale = quantize_rows(x.reshape(-1, n_in), torch.float8_e4m3fn, E4M3_MAX)
    if use_scaled_mm and x.dtype == torch.bfloat16 and x_q.shape[0] > 0:
        out = torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)
    else:  # the same rounding, dequantized and multiplied in fp32
        out = (x_q.float() * x_scale) @ (w_q.float() * w_scale.t()).t()
    if bias is not None:
        out = out + bias
    return out.to(x.dtype).reshape(*lead, w_q.shape[0])


class Fp8Linear(torch.nn.Module):
    """A frozen linear layer that only predicts (``model.fp8_predict``): its weight in e4m3, one scale per output
    feature, multiplied by :func:`linear`. Built from the weight in the compute dtype (a plain ``nn.Linear``'s, or the
    dequantized nf4 weight :mod:`trainer_core.fastpath.dequant_cache` computes); the input is cast to that dtype and
    the output back to the input's, as ``Linear4bit.forward`` does. No gradient flows through it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w_q, w_scale = quantize_rows(weight.detach(), torch.float8_e4m3fn, E4M3_MAX)  # (out, in), (out, 1)
        self.register_buffer("weight_fp8", w_q, persistent=False)
        self.register_buffer("weight_scale", w_scale.reshape(1, -1).contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to(weight.dtype), persistent=False)
        self.compute_dtype = weight.dtype
        self.out_features, self.in_features = weight.shape
        self.use_scaled_mm = scaled_mm_available(weight.device, weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x.to(self.compute_dtype), self.weight_fp8, self.weight_scale, self.bias,
                      self.use_scaled_mm).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{'_scaled_mm' if self.use_scaled_mm else 'emulated'}")


class LinearFp8Backward(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` forward; backward: only ``grad_x``, through :func:`grad_input` (weight and bias
    are frozen: no gradient for them)."""

    @staticmethod
    def forward(ctx, x, weight, bias, w_q, w_scale, use_scaled_mm: bool):
        ctx.save_for_backward(w_q, w_scale)
        ctx.use_scaled_mm = use_scaled_mm
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        w_q, w_scale = ctx.saved_tensors
        return grad_input(grad_y, w_q, w_scale, ctx.use_scaled_mm), None, None, None, None, None
