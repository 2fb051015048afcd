"""The placement: what the machine and the data decide about a model's run, derived once after the plain build and
handed, beside the config, to :func:`trainer_core.fastpath.apply`.

The config says what is wanted (``model.gradient_checkpointing: auto``, ``train.batch_size``); the placement says
what this device, with this much free memory and rows this long, will do: recompute or not (and which layers), in
micro-batches of how many rows. The fold and the benchmark derive it with the same function, so a benchmark times the
model a fold trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from trainer_core.config import Config
from trainer_core.model.build import decoder_layer_count
from trainer_core.model.memory import free_device_bytes, plan_memory, recomputed_layers


@dataclass(frozen=True)
class Placement:
    device: torch.device
    precision: str  # resolved: bf16 / fp16 / fp32
    micro_batch: int  # rows per rank per micro-batch (predicting: rows per batch the weight cache leaves room for)
    grad_accum: int  # micro-batches per optimizer step
    seq_len: int  # tokens of the longest row (the activations the memory plan and the weight cache leave room for)
    recompute: Literal["off", "on", "reentrant"]
    recompute_layers: range | None = None  # with recompute "on": only these decoder layers (None: every layer)
    budget_gib: float | None = None  # train.memory_budget_gib (or the benchmark's --budget-gib)
    training: bool = True  # False: a model loaded to predict (no recomputation, no dropout sharing)
    reason: str = ""  # why this recomputation, in words, for logs and the benchmark's table

    def recomputed(self, n_trained: int) -> int:
        """How many of the ``n_trained`` trained layers (the top ones) recompute their activations."""
        if self.recompute == "off":
            return 0
        if self.recompute_layers is None:
            return n_trained
        return len(self.recompute_layers)


def place(cfg: Config, model, *, device: torch.device, precision: str, seq_len: int, micro_batch: int,
          grad_accum: int = 1, budget_gib: float | None = None, free_bytes: float | None = None,
          training: bool = True) -> Placement:
    """The placement of ``model`` (built, not yet changed by the fast path) for ``cfg``.

    ``model.gradient_checkpointing`` off/on/reentrant is taken as configured; ``auto`` on a GPU is the memory plan
    (:func:`trainer_core.model.memory.plan_memory`) for ``free_bytes`` (default: what this process can still
    allocate, within ``budget_gib``; a DDP fold passes the smallest free memory of its ranks, so every rank plans the
    same), which may also split micro-batches; ``auto`` elsewhere is off. ``training=False``: a model that only
    predicts - no recomputation."""
    mode = cfg.model.gradient_checkpointing
    common = dict(device=device, precision=precision, seq_len=seq_len, budget_gib=budget_gib, training=training)
    if not training:
        return Placement(micro_batch=micro_batch, grad_accum=1, recompute="off", reason="prediction", **common)
    if mode != "auto":
        return Placement(micro_batch=micro_batch, grad_accum=grad_accum, recompute=mode, reason=mode, **common)
    if device.type != "cuda":
        return Placement(micro_batch=micro_batch, grad_accum=grad_accum, recompute="off", reason="auto: off on CPU",
                         **common)
    free = free_device_bytes(device, budget_gib) if free_bytes is None else free_bytes
    plan = plan_memory(model.config, n_trained_layers=decoder_layer_count(model) - cfg.lora.freeze_layers,
                       seq_len=seq_len, batch_size=micro_batch, grad_accum=grad_accum, free_bytes=free)
    reason = f"auto: {plan.reason} ({plan.need_gib:.1f} GiB estimated of {plan.free_gib:.1f} GiB free)"
    return Placement(micro_batch=plan.micro_batch, grad_accum=plan.grad_accum,
                     recompute="on" if plan.checkpointing else "off",
                     recompute_layers=recomputed_layers(cfg, plan) if plan.checkpointing else None, reason=reason,
                     **common)
