"""The distillation loss: ``(1 - w) * CE(label) + w * T^2 * KL(teacher_T || student_T)``.

``teacher_T`` is the teacher's probabilities re-tempered as ``softmax(log p / T)`` and ``student_T`` is
``softmax(logits / T)``; the ``T^2`` factor keeps the soft term's gradients on the scale of the hard term's whatever T
is (Hinton et al., 2015). ``w = 0`` is plain cross-entropy, ``w = 1`` learns from the teacher alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORED_LABEL = -100  # F.cross_entropy's default ignore_index: a row that only fills a short batch


def distill_loss(logits: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor], weight: float,
                 temperature: float = 1.0) -> torch.Tensor:
    """Mean loss over the batch; ``targets`` = (labels (B,) int64, teacher probabilities (B, 3))."""
    labels, teacher = targets
    keep = labels != IGNORED_LABEL  # rows that only fill a short batch count in neither term
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORED_LABEL)
    teacher_t = torch.softmax(torch.log(teacher[keep].clamp_min(1e-12)) / temperature, dim=-1)
    kl = F.kl_div(torch.log_softmax(logits[keep] / temperature, dim=-1), teacher_t, reduction="batchmean")
    return (1.0 - weight) * ce + weight * temperature ** 2 * kl


def fold_loss(train_cfg, soft_labels: bool) -> Callable | None:
    """A fold's training loss: None (cross-entropy, ``train_step``'s default), or with soft labels
    :func:`distill_loss` at ``train.distill_weight`` and ``train.distill_temperature``."""
    if not soft_labels:
        return None
    return functools.partial(distill_loss, weight=train_cfg.distill_weight, temperature=train_cfg.distill_temperature)
