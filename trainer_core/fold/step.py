"""One optimizer step: forward/backward over micro-batches, unscale, clip, step. Shared by the fold loop and the
benchmark so the benchmark times exactly the code that trains."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F


def micro_batch_loss(model, micro_batch: tuple, autocast, loss_fn: Callable | None = None) -> torch.Tensor:
    """The loss of one micro-batch (input_ids (B, T), mask (B, T), targets[, extra model inputs]) as a training step
    computes it (``loss_fn(logits, targets)``, default cross-entropy on labels); also what ``model.precompile``'s
    passes run, so they compile exactly the graphs the steps use."""
    input_ids, mask, targets, *extra = micro_batch
    with autocast():
        logits = model(input_ids=input_ids, attention_mask=mask, **(extra[0] if extra else {})).logits.float()
    return (loss_fn or F.cross_entropy)(logits, targets)


def train_step(model, micro_batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], optimizer, scaler,
               params: list[torch.nn.Parameter], autocast, max_grad_norm: float | None,
               ddp: bool = False, loss_fn: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the mean loss over ``micro_batches`` [(input_ids (B, T), mask (B, T), targets[, extra model
    inputs: a dict such as {"length_features": (B, 6)}])], then one optimizer step. Returns (mean loss, grad norm)
    as device tensors: no host sync on the hot path. ``loss_fn(logits, targets)``: default cross-entropy on labels
    (B,); distillation passes its own."""
    n = len(micro_batches)
    total = torch.zeros((), device=micro_batches[0][0].device)
    for i, micro_batch in enumerate(micro_batches):
        # DDP all-reduces only on the last micro-batch of the step
        sync = contextlib.nullcontext() if (not ddp or i == n - 1) else model.no_sync()
        with sync:
            loss = micro_batch_loss(model, micro_batch, autocast, loss_fn) / n
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm
