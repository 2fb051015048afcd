"""An exact memory-for-speed trade on a 4-bit model: frozen nf4 weights kept dequantized.

``model.dequant_cache``: bitsandbytes dequantizes every nf4 weight at every call - once in the forward pass and once
more in the backward pass of each adapted layer (7% of the compiled step's device time on an H200) - and for more than
256 rows (every training micro-batch) it computes ``linear(x, dequantize_4bit(W).to(x.dtype))``. The nf4 weights are
frozen, so that dequantized matrix is the same every step: :func:`cache_dequantized_weights` computes it once and
replaces the ``Linear4bit`` with a plain linear layer holding it. Same numbers, 4x the weight memory (bf16 instead of
4 bits): about 17 GiB more for Gemma-2 9B, so it is only done where free memory allows (``auto``), top layers first
(those are dequantized twice a step). A fold model loaded to predict (``orchestrator.predict``) is cached the same way,
beside its inference batch instead of a training step's activations (:func:`cache_for_prediction`).

``model.fp8_backward`` (opt-in, changes numerics): the cached layers of trained decoder layers also keep an fp8 copy of
their weight (1 byte per weight, counted in the cache's budget) for an fp8 backward matmul
(:func:`enable_fp8_backward`, :mod:`trainer_core.fastpath.fp8`), a step of its own in
:func:`trainer_core.fastpath.apply` after the cache.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F

from trainer_core.fastpath import fp8
from trainer_core.model.build import decoder_layers
from trainer_core.model.memory import SAFETY, activation_bytes_per_token, free_device_bytes, inference_batch_bytes

log = logging.getLogger(__name__)


class DequantizedLinear(torch.nn.Module):
    """A frozen ``Linear4bit`` with its weight dequantized once: casts the input to the compute dtype and the output
    back to the input's dtype, as ``Linear4bit.forward`` does."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)  # (out, in), compute dtype
        self.bias = None if bias is None else torch.nn.Parameter(bias.to(weight.dtype), requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        # model.fp8_backward: the weight quantized once for the backward matmul. Plain attributes, not buffers: never
        # saved (rebuilt from the weight) and never broadcast by DDP (it syncs buffers at every forward).
        self.weight_fp8: torch.Tensor | None = None
        self.weight_fp8_scale: torch.Tensor | None = None
        self.fp8_scaled_mm = False

    def enable_fp8_backward(self) -> bool:
        """Quantize the weight for :class:`trainer_core.fastpath.fp8.LinearFp8Backward`; False (nothing done) when the
        shapes
        do not fit ``_scaled_mm``."""
        if not fp8.shapes_fit(self.out_features, self.in_features):
            return False
        self.weight_fp8, self.weight_fp8_scale = fp8.quantize_weight(self.weight)
        self.fp8_scaled_mm = fp8.scaled_mm_available(self.weight.device, self.weight.dtype)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_fp8 is None:
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)
        return fp8.LinearFp8Backward.apply(x.to(self.weight.dtype), self.weight, self.bias, self.weight_fp8,
                                           self.weight_fp8_scale, self.fp8_scaled_mm).to(x.dtype)


def _dequantize(module, dtype: torch.dtype) -> torch.Tensor:
    """The weight as ``Linear4bit`` feeds it to the matmul: dequantized in fp32 (its input, the residual stream that
    peft's k-bit preparation keeps in fp32, sets that dtype), then cast to ``dtype`` as autocast does."""
    import bitsandbytes.functional as bnb_functional

    state = copy.copy(module.weight.quant_state)
    state.dtype = torch.float32
    return bnb_functional.dequantize_4bit(module.weight.data, state).to(dtype)


def _is_4bit(module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:  # no bitsandbytes: no 4-bit layers to cache
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def cache_dequantized_weights(model, max_bytes: float, dtype: torch.dtype, fp8_from: int | None = None,
                              fp8_forward: bool = False) -> tuple[int, int, float]:
    """Replace frozen 4-bit linear layers by :class:`DequantizedLinear` copies in ``dtype`` (the autocast dtype, or
    fp32 without autocast), top decoder layer first, while the copies' total stays within ``max_bytes``. Returns
    (layers cached, decoder layers in the model, GiB used). ``fp8_from``: decoder layers from this index on (the
    trained ones) will also hold an fp8 copy (``model.fp8_backward``, :func:`enable_fp8_backward`): one more byte per
    weight counted against ``max_bytes``. ``fp8_forward`` (``model.fp8_predict``, a model that only predicts): each
    weight is kept as :class:`trainer_core.fastpath.fp8.Fp8Linear` instead, 1 byte a weight.

    Only whole decoder layers are cached (a layer's projections share one compiled graph)."""
    used, cached = 0.0, 0
    kind = fp8.Fp8Linear if fp8_forward else DequantizedLinear
    layers = decoder_layers(model)
    for index in reversed(range(len(layers))):
        targets = [(parent, name, child) for parent in layers[index].modules()
                   for name, child in parent.named_children() if _is_4bit(child)]
        if not targets:
            continue
        use_fp8 = fp8_from is not None and index >= fp8_from
        per_weight = 1 if fp8_forward else dtype.itemsize + use_fp8
        size = sum(c.out_features * c.in_features * per_weight for _, _, c in targets)
        if used + size > max_bytes:
            break
        for parent, name, child in targets:
            setattr(parent, name, kind(_dequantize(child, dtype), child.bias))
        used += size
        cached += 1
    if cached and torch.cuda.is_available():
        torch.cuda.empty_cache()  # the nf4 storage of the replaced layers
    return cached, len(layers), used / 2**30


def enable_fp8_backward(model, from_layer: int) -> str:
    """``model.fp8_backward``: the :class:`DequantizedLinear` layers of decoder layers ``from_layer`` and up (the
    trained ones) get an fp8 copy of their weight for the backward matmul. Returns a note for logs and benchmark
    tables."""
    linears = [m for layer in list(decoder_layers(model))[from_layer:] for m in layer.modules()
               if isinstance(m, DequantizedLinear)]
    fp8_linears = [m for m in linears if m.enable_fp8_backward()]
    path = "_scaled_mm" if any(m.fp8_scaled_mm for m in fp8_linears) else "emulated"
    note = f"fp8 backward in {len(fp8_linears)} linear layers ({path})"
    log.info(note)
    return note


def cache_for_training(model, mode: str, dtype: torch.dtype, device: torch.device, *, freeze_layers: int,
                       seq_len: int, micro_batch: int, budget_gib: float | None, recomputed: int = 0,
                       fp8_backward: bool = False) -> str:
    """``model.dequant_cache`` after the memory plan: ``on`` caches every layer, ``auto`` as many as fit in the free
    memory beside the activations of a ``micro_batch`` x ``seq_len`` step with ``recomputed`` of the trained layers
    (those from ``freeze_layers`` on) recomputing theirs, ``off`` none. ``fp8_backward``: room for the fp8 copies of
    the trained layers' weights too. Returns a note for logs and benchmark tables (empty when nothing was cached)."""
    n_trained = len(decoder_layers(model)) - freeze_layers
    need = activation_bytes_per_token(model.config, n_trained, seq_len, recomputed > 0,
                                      recomputed) * micro_batch * seq_len * SAFETY
    return _cache_beside(model, mode, need, dtype, device, budget_gib, freeze_layers if fp8_backward else None)


def cache_for_prediction(model, mode: str, dtype: torch.dtype, device: torch.device, *, seq_len: int, rows: int,
                         budget_gib: float | None, seqs_per_row: int = 1, fp8_forward: bool = False) -> str:
    """``model.dequant_cache`` for a model that only predicts (``orchestrator.predict``'s fold models): ``on`` caches
    every layer, ``auto`` as many as fit beside the inference activations of ``rows`` x ``seq_len`` tokens (the batch
    prediction will use; for ``train.eval_batch_size=auto`` the largest it may pick, so the cache never makes the batch
    smaller), ``off`` none. A held-out batch inside a fold runs on the cached weights of training: this gives a loaded
    fold model the same weights. ``fp8_forward`` (``model.fp8_predict``): the weights kept in fp8 instead
    (:class:`trainer_core.fastpath.fp8.Fp8Linear`, half the bytes). Returns a note for logs (empty when ``mode`` is
    off)."""
    need = inference_batch_bytes(model.config, seq_len=seq_len, rows=rows, seqs_per_row=seqs_per_row)
    return _cache_beside(model, mode, need, dtype, device, budget_gib, fp8_forward=fp8_forward)


def _cache_beside(model, mode: str, need_bytes: float, dtype: torch.dtype, device: torch.device,
                  budget_gib: float | None, fp8_from: int | None = None, fp8_forward: bool = False) -> str:
    """``mode`` off: nothing; on: every layer; auto: within the free memory less ``need_bytes``. Returns the note."""
    if mode == "off":
        return ""
    room = float("inf") if mode == "on" else free_device_bytes(device, budget_gib) - need_bytes
    n, total, gib = cache_dequantized_weights(model, room, dtype, fp8_from, fp8_forward)
    note = f"dequantized weights cached{' in fp8' if fp8_forward else ''}: {n}/{total} layers ({gib:.1f} GiB)"
    log.info(note)
    return note


def predict_in_fp8(model) -> str:
    """``model.fp8_predict`` for a model that only predicts: every linear layer of its decoder layers that is
    a plain ``nn.Linear`` or a :class:`DequantizedLinear` becomes a :class:`trainer_core.fastpath.fp8.Fp8Linear`
    (nf4 layers the cache left 4-bit stay bitsandbytes'; LoRA's own matrices stay as they are), where the shapes fit
    ``_scaled_mm`` (both sides multiples of 16). Returns a note for logs."""
    swaps = [(parent, name, child) for layer in decoder_layers(model) for where, parent in layer.named_modules()
             if not any(part.startswith("lora_") for part in where.split("."))  # peft's lora_A/lora_B dicts
             for name, child in parent.named_children()
             if (type(child) is torch.nn.Linear or isinstance(child, DequantizedLinear))
             and fp8.shapes_fit(child.out_features, child.in_features)]
    for parent, name, child in swaps:
        setattr(parent, name, fp8.Fp8Linear(child.weight, child.bias))
    layers = [m for m in model.modules() if isinstance(m, fp8.Fp8Linear)]
    path = "_scaled_mm" if any(m.use_scaled_mm for m in layers) else "emulated"
    note = f"fp8 forward in {len(layers)} linear layers ({path})" if layers else "fp8 forward: no linear layer fits"
    log.info(note)
    return note
