"""Build a model the way a fold does (fastpath.prepare_load, build_model, fastpath.place, fastpath.apply), on the CPU,
for the fast-path tests."""

from __future__ import annotations

from dataclasses import replace

import torch

from trainer_core import fastpath
from trainer_core.model.build import build_model


def build_fast(cfg, *, precision: str = "fp32", checkpointing: str | None = None, seed: int = 0, seq_len: int = 64,
               micro_batch: int = 4, device: torch.device = torch.device("cpu")):
    """``cfg``'s model with its fast path applied; ``checkpointing`` overrides ``model.gradient_checkpointing``."""
    if checkpointing is not None:
        cfg = replace(cfg, model=replace(cfg.model, gradient_checkpointing=checkpointing))
    fastpath.prepare_load(cfg.model)
    model = build_model(cfg.model, cfg.lora, pad_token_id=0, precision=precision, device=device, seed=seed)
    placement = fastpath.place(cfg, model, device=device, precision=precision, seq_len=seq_len,
                               micro_batch=micro_batch)
    fastpath.apply(model, cfg, placement)
    return model
