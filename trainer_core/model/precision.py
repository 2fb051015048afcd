"""Numeric precision: the dtypes of ``train.precision``, 'auto' resolved for the device, autocast contexts, and the
embedding table kept in its checkpoint precision."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_autocast(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for ``precision`` (fp32: no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=DTYPES[precision])


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def random_weights_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype a ``model.init=random`` model is saved in (part of its cache key) for ``train.precision`` on
    ``device``: fp32 for fp32 runs, bf16 for bf16 and fp16 runs (one copy serves both). 'auto' is resolved first, as a
    fold resolves it, so a caller that builds the cache ahead of the folds (``orchestrator.efficiency``) builds the
    copy they load. ``build_model`` and every such caller use this one rule."""
    return torch.float32 if resolve_precision(precision, device) == "fp32" else torch.bfloat16


def keep_embedding_dtype(model, dtype: torch.dtype) -> bool:
    """Store the input embedding table in ``dtype`` (its checkpoint precision) and hand out fp32 rows.

    peft's k-bit preparation upcasts every non-quantized tensor to fp32, the 256,000 x 3,584 embedding table too
    (3.7 GB for Gemma-2 9B). Its values came from ``dtype``, so casting the table back is exact, and casting the
    looked-up rows to fp32 gives the fp32 table's output bit for bit. Part of the plain build (it undoes an upcast, it
    changes no number); the hook holds no reference to anything but the cast. Returns whether the table was changed."""
    emb = model.get_input_embeddings()
    if emb is None or emb.weight.dtype != torch.float32 or dtype == torch.float32 or emb.weight.requires_grad:
        return False
    low = emb.weight.data.to(dtype)
    if not torch.equal(low.float(), emb.weight.data):  # not exactly representable: keep fp32
        return False
    emb.weight.data = low
    emb.register_forward_hook(_rows_in_fp32)
    return True


def _rows_in_fp32(_module, _inputs, out: torch.Tensor) -> torch.Tensor:
    return out.float()
