"""Numeric precision: the dtypes of ``train.precision``, 'auto' resolved for the device, and autocast contexts."""

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
