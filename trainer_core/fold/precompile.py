"""Compiling a fold's training graphs before its first step (``model.precompile``).

Layers compiled for static shapes (``model.compile=on`` with ``model.length_bucket``) compile each kind of layer once
per batch length, and a length first appears whenever the shuffled batch order reaches it: on an H100 a cold 9B fold
stalled at steps 1-10, 10-20 and 50-60 (docs/PERFORMANCE.md, session 12), and a length first seen late stalls a fold
near its end. So before the first step the fold runs one forward and backward pass per length its steps will use,
longest first:

- every training graph compiles now, in one visible phase, and the steps after it run at the steady pace (the console's
  ETA is right from the first report);
- the longest batch runs first, so a length that does not fit in memory fails before any step, not hours in;
- the passes change nothing: their gradients are dropped before the first step, no optimizer step runs, and the random
  state (dropout masks) is put back (``torch.random.fork_rng``), so the fold trains exactly as without them.

With several ranks every rank runs the same lengths (the union of what the ranks' steps use) in the same order, under
DDP's ``no_sync`` (no gradient all-reduce); a rank whose steps never use a length runs a batch of its own rows padded
or cut to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from trainer_core.data.text import padded_width
from trainer_core.fold.step import micro_batch_loss


def first_batch_of_each_length(step_rows: Callable[[int], list[np.ndarray]], ids: list, steps: range,
                               multiple: int) -> dict[int, np.ndarray]:
    """{batch length: row indices of the first micro-batch of that length} over ``steps``; ``step_rows(step)``: this
    rank's micro-batches of a step (``BatchSchedule.step_rows``); ``ids``: the encoded training rows; ``multiple``:
    lengths rounded up to it (``trainer_core.config.pad_multiple``)."""
    first: dict[int, np.ndarray] = {}
    for step in steps:
        for idx in step_rows(step):
            first.setdefault(padded_width([ids[i] for i in idx], multiple), idx)
    return first


def resized(batch: tuple, length: int, pad_id: int) -> tuple:
    """``batch`` (input_ids (B, T), mask (B, T), *rest) right-padded or cut to ``length`` tokens."""
    input_ids, mask, *rest = batch
    t = input_ids.shape[1]
    if t < length:
        input_ids = F.pad(input_ids, (0, length - t), value=pad_id)
        mask = F.pad(mask, (0, length - t), value=0)
    else:
        input_ids, mask = input_ids[:, :length], mask[:, :length]
    return (input_ids, mask, *rest)


def moved(batch, device: torch.device):
    """``batch`` (input_ids, mask, targets or a tuple of soft targets, and any dict of extra inputs) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, tuple):
        return tuple(moved(v, device) for v in batch)
    if isinstance(batch, dict):
        return {k: moved(v, device) for k, v in batch.items()}
    return batch


def compile_passes(model, batches: list[tuple], params: list[torch.nn.Parameter], autocast, device: torch.device,
                   loss_fn: Callable | None = None, ddp: bool = False) -> None:
    """One forward and backward pass of each of ``batches`` (as ``train_step`` runs them), then every gradient of
    ``params`` dropped; the process's random state (CPU, and ``device`` when it is a GPU) is what it was before."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for batch in batches:
            with model.no_sync() if ddp else contextlib.nullcontext():
                micro_batch_loss(model, batch, autocast, loss_fn).backward()
            for p in params:
                p.grad = None
