"""Batch plans and collation. Every plan is a pure function of (lengths, seed, epoch), so a resumed fold replays the
exact same order and skips what it already trained on."""

from __future__ import annotations

import math

import numpy as np
import torch

from trainer_core.data.text import pad_rows


def epoch_batches(lengths: np.ndarray, batch_size: int, world: int, seed: int, epoch: int,
                  group_by_length: bool) -> list[np.ndarray]:
    """Global batches of ``batch_size * world`` row indices for one epoch (rank r takes slice r of each).

    With ``group_by_length`` rows are shuffled, cut into chunks of 64 global batches, each chunk sorted by length and
    re-cut into batches, and the batch order shuffled: rows of similar length share a batch (little padding) while the
    order stays random. With several ranks the last partial batch is filled from the epoch's first rows so every rank
    runs the same number of steps."""
    rng = np.random.default_rng([seed, epoch])
    n = len(lengths)
    gbs = batch_size * world
    order = rng.permutation(n)
    if group_by_length:
        chunk = gbs * 64
        parts = [order[i:i + chunk] for i in range(0, n, chunk)]
        order = np.concatenate([p[np.argsort(-lengths[p], kind="stable")] for p in parts])
    if world > 1 and n % gbs:
        order = np.concatenate([order, order[: gbs - n % gbs]])
    batches = [order[i:i + gbs] for i in range(0, len(order), gbs)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def per_rank_batch(batch_size: int, world: int) -> int:
    """Rows per rank per micro-batch: ``batch_size`` split over the ranks when it divides, so the optimizer batch
    (``batch_size x grad_accum``) stays the recipe's; else every rank takes the whole ``batch_size``."""
    return batch_size // world if world > 1 and batch_size % world == 0 else batch_size


def planned_steps(n_train: int, batch_size: int, world: int, epochs: float, grad_accum: int,
                  max_steps: int | None) -> tuple[int, int]:
    """(micro-batches per epoch, optimizer steps) of a fold with ``n_train`` training rows: what ``train_fold`` runs,
    and what a sweep needs to space its interim evaluations before any fold starts."""
    micro_per_epoch = math.ceil(n_train / (batch_size * world))  # = len(epoch_batches(...)), last batch partial/filled
    return micro_per_epoch, max_steps or math.ceil(math.ceil(epochs * micro_per_epoch) / grad_accum)


def rank_slice(global_batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    per = math.ceil(len(global_batch) / world)
    return global_batch[rank * per:(rank + 1) * per]


def row_tokens(row: list[int] | tuple[list[int], ...]) -> int:
    """Tokens of one encoded row: its id list, or both sequences of a pairwise row (a tuple of id lists)."""
    return sum(len(x) for x in row) if isinstance(row, tuple) else len(row)


def collate(ids: list, pad_id: int, device: torch.device, multiple: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) int64 input ids and attention mask on ``device`` (:func:`trainer_core.data.text.pad_rows`,
    which an export's predictor shares). Pairwise rows (tuples of sequences) are laid out side by side: B rows of 2
    sequences give (2B, T), row i's sequences at 2i and 2i + 1. ``multiple``: T rounded up to a multiple of it."""
    input_ids, mask = (torch.from_numpy(a) for a in pad_rows(ids, pad_id, multiple))
    return input_ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)


def length_batch(features: np.ndarray, idx, device: torch.device) -> torch.Tensor:
    """(B, 6) float32 length features of rows ``idx`` (``model.length_features``) on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(features[np.asarray(idx)], dtype=np.float32)).to(device)


def padding_waste(batches: list[list[int]]) -> float:
    """Fraction of token slots that are padding over the given batches of sequence lengths."""
    real = sum(sum(b) for b in batches)
    slots = sum(max(b) * len(b) for b in batches)
    return 1.0 - real / slots if slots else 0.0
