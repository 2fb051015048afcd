"""A fold's rows as the loop needs them: tokenized training and held-out rows, and the batch schedule (which rows
each rank takes at each optimizer step), decided once from the data, the config and the placement (the memory plan,
``trainer_core.fastpath.placement``)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from trainer_core.config import Config
from trainer_core.data.batching import (
    collate,
    epoch_batches,
    length_batch,
    per_rank_batch,
    planned_steps,
    rank_slice,
    row_tokens,
)
from trainer_core.data.soft_labels import training_targets
from trainer_core.data.tokenization import encode, features
from trainer_core.data.train_rows import fold_training_rows, load_extra_rows
from trainer_core.fastpath.placement import Placement
from trainer_core.fold.distill import IGNORED_LABEL

log = logging.getLogger(__name__)


@dataclass
class FoldData:
    """Training rows (every row whose fold != ``fold``, plus the extra and swapped rows that
    ``trainer_core.data.train_rows`` adds) and held-out rows (sorted by id), tokenized as the configured head reads
    them."""

    train_rows: pd.DataFrame
    val_rows: pd.DataFrame
    train_ids: list  # one id list per row (joint head) or a pair of them (pairwise head)
    val_ids: list
    train_labels: torch.Tensor  # (N_train,) int64
    val_labels: np.ndarray  # (N_val,) int64
    lengths: np.ndarray  # (N_train,) tokens per training row
    n_fold_rows: int  # training rows from the other folds (before extra and swapped rows)
    prior_labels: np.ndarray  # their labels: the class prior baseline comes from these alone
    row_counts: dict  # n_extra_train_rows, extra_dropped_shared_prompt, n_swapped_train_rows
    train_soft: torch.Tensor | None = None  # (N_train, 3) teacher probabilities with train.soft_labels, else None
    train_feats: np.ndarray | None = None  # (N_train, 6) untruncated length features with model.length_features
    val_feats: np.ndarray | None = None  # (N_val, 6)

    @classmethod
    def build(cls, cfg: Config, fold: int, rows: pd.DataFrame, tok) -> FoldData:
        training = fold_training_rows(rows, fold, load_extra_rows(cfg.data.extra_train_path), cfg.train.swap_augment)
        train_rows = training.rows
        val_rows = rows[rows["fold"] == fold].sort_values("id").reset_index(drop=True)
        if training.n_fold_rows == 0 or len(val_rows) == 0:
            raise ValueError(f"fold {fold}: {training.n_fold_rows} training rows and {len(val_rows)} held-out rows; "
                             "need both")
        train_ids, val_ids = encode(train_rows, tok, cfg), encode(val_rows, tok, cfg)
        soft = None
        # in-fold soft labels: only the file's rows for this fold (trainer_core.data.soft_labels)
        if cfg.train.soft_labels:
            soft = torch.tensor(training_targets(cfg.train.soft_labels, fold, rows, train_rows), dtype=torch.float32)
        return cls(train_rows=train_rows, val_rows=val_rows, train_ids=train_ids, val_ids=val_ids,
                   train_labels=torch.tensor(train_rows["label"].values, dtype=torch.long),
                   val_labels=val_rows["label"].to_numpy(), lengths=np.array([row_tokens(x) for x in train_ids]),
                   n_fold_rows=training.n_fold_rows, prior_labels=rows.loc[rows["fold"] != fold, "label"].to_numpy(),
                   row_counts=training.counts(), train_soft=soft, train_feats=features(train_rows, tok, cfg),
                   val_feats=features(val_rows, tok, cfg))

    def batch(self, idx: np.ndarray, pad_id: int, device: torch.device, fill_to: int | None = None,
              multiple: int = 0):
        """(input_ids (B, T), mask (B, T), targets) of the training rows ``idx``; targets are labels (B,), or
        (labels, teacher probabilities (B, 3)) with soft labels; with length features a fourth item, the model's extra
        inputs {"length_features": (B, 6)}. ``fill_to``: a short batch is filled up to that many rows with ignored
        ones (``fill_batch``); ``multiple``: the length rounded up to it (``pad_multiple``)."""
        labels = self.train_labels[idx]
        if fill_to:
            idx, labels = fill_batch(idx, labels, fill_to)
        input_ids, mask = collate([self.train_ids[i] for i in idx], pad_id, device, multiple)
        labels = labels.to(device, non_blocking=True)
        targets = labels if self.train_soft is None else (labels, self.train_soft[idx].to(device, non_blocking=True))
        if self.train_feats is None:
            return input_ids, mask, targets
        return input_ids, mask, targets, {"length_features": length_batch(self.train_feats, idx, device)}


@dataclass
class BatchSchedule:
    """Which training rows each rank takes at each optimizer step: a pure function of (lengths, seed, epoch), so a
    resumed fold replays the exact same order."""

    lengths: np.ndarray
    micro_batch: int  # rows per rank per micro-batch
    grad_accum: int
    world: int
    seed: int
    group_by_length: bool
    micro_per_epoch: int
    total_steps: int
    total_micro: int
    _epochs: dict[int, list[np.ndarray]] = field(default_factory=dict, repr=False)

    def step_rows(self, step: int, rank: int) -> list[np.ndarray]:
        """Row indices of this rank's micro-batches in optimizer step ``step`` (the last step may have fewer)."""
        first = step * self.grad_accum
        return [self._micro(m, rank) for m in range(first, min(first + self.grad_accum, self.total_micro))]

    def _micro(self, m: int, rank: int) -> np.ndarray:
        epoch, pos = divmod(m, self.micro_per_epoch)
        if epoch not in self._epochs:  # one epoch's plan at a time
            self._epochs.clear()
            self._epochs[epoch] = epoch_batches(self.lengths, self.micro_batch, self.world, self.seed, epoch,
                                                self.group_by_length)
        return rank_slice(self._epochs[epoch][pos], rank, self.world)


def plan_batches(cfg: Config, fold: int, lengths: np.ndarray, placement: Placement, world: int) -> BatchSchedule:
    """The fold's batch schedule in the placement's micro-batches (``trainer_core.fastpath.place``: with several ranks
    each takes ``batch_size / world`` rows of every micro-batch so the optimizer batch, ``batch_size x grad_accum``,
    stays the recipe's; the memory plan may split micro-batches further)."""
    t = cfg.train
    micro_bs, accum = placement.micro_batch, placement.grad_accum
    micro_per_epoch, total_steps = planned_steps(len(lengths), micro_bs, world, t.epochs, accum, t.max_steps)
    total_micro = total_steps * accum if t.max_steps else min(math.ceil(t.epochs * micro_per_epoch),
                                                               total_steps * accum)
    return BatchSchedule(lengths=lengths, micro_batch=micro_bs, grad_accum=accum, world=world, seed=t.seed + fold,
                         group_by_length=t.group_by_length, micro_per_epoch=micro_per_epoch,
                         total_steps=total_steps, total_micro=total_micro)


def rank_micro_batch(cfg: Config, fold: int, world: int) -> int:
    """Rows of each micro-batch one rank takes before the memory plan: ``train.batch_size / world``."""
    micro_bs = per_rank_batch(cfg.train.batch_size, world)
    if world > 1 and micro_bs == cfg.train.batch_size:
        log.warning("fold %d: train.batch_size=%d does not split over %d ranks; the optimizer batch grows %dx",
                    fold, cfg.train.batch_size, world, world)
    return micro_bs


def fill_batch(idx: np.ndarray, labels: torch.Tensor, size: int) -> tuple[np.ndarray, torch.Tensor]:
    """A short (last) micro-batch filled up to ``size`` rows by repeating its first row with an ignored label: the
    loss (a mean over the rows whose label is not ignored) and its gradients are those of the real rows, while the
    batch keeps the shape the compiled layers were built for (a new batch size recompiles them: ~30 s on an H200)."""
    short = size - len(idx)
    if short <= 0:
        return idx, labels
    return (np.concatenate([idx, np.repeat(idx[:1], short)]),
            torch.cat([labels, torch.full((short,), IGNORED_LABEL, dtype=labels.dtype)]))
