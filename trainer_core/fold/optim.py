"""Optimizer and learning-rate schedule: bitsandbytes' 8-bit AdamW where it runs, torch AdamW (with a logged reason)
where it doesn't; linear warmup, then linear, cosine or constant."""

from __future__ import annotations

import logging
import math

import torch

from trainer_core.config import TrainConfig

log = logging.getLogger(__name__)


def build_optimizer(params: list[torch.nn.Parameter], t: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    kw = dict(lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    if t.optimizer == "adamw":
        # fused: one kernel for every tensor's update instead of several per tensor (same update rule)
        return torch.optim.AdamW(params, fused=device.type == "cuda", **kw)
    try:
        import bitsandbytes as bnb

        # Paging only exists for CUDA memory; on the CPU bitsandbytes would warn and fall back anyway.
        cls = bnb.optim.PagedAdamW8bit if t.optimizer == "paged_adamw_8bit" and device.type == "cuda" \
            else bnb.optim.AdamW8bit
        return cls(params, **kw)
    except Exception as e:  # noqa: BLE001 - missing library, unsupported CPU or GPU: all mean "use torch"
        log.warning("train.optimizer=%s is unavailable here (%s: %s); using torch.optim.AdamW (32-bit states)",
                    t.optimizer, type(e).__name__, e)
        return torch.optim.AdamW(params, **kw)


def lr_at(step: int, total_steps: int, t: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the configured decay to 0."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    progress = (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if t.schedule == "cosine":
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return t.lr * (1.0 - progress)
