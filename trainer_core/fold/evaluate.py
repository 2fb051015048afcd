"""Scoring a fold's held-out rows with its model: rows sharded over the ranks and gathered on every rank
(:meth:`HeldOut.score`), the interim score sweeps stop bad trials on (:meth:`HeldOut.interim`), the fold's OOF table
with the TTA columns (:meth:`HeldOut.oof`), and the scores that go into the fold's metrics (:func:`held_out_scores`).
The loop (:mod:`trainer_core.fold.loop`) builds one :class:`HeldOut` after the model and adds the run's own figures
(steps, seconds, device) to the scores."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from trainer_core.config import Config
from trainer_core.data.text import swapped_length_features
from trainer_core.data.tokenization import encode
from trainer_core.data.tta import swap_responses, tta_average
from trainer_core.fold.data import FoldData
from trainer_core.fold.inference import predict_probs, resolve_eval_batch_size
from trainer_core.fold.ranks import gather_rows
from trainer_core.metrics import accuracy, clip_probs, log_loss, prior_probs

log = logging.getLogger(__name__)


class HeldOut:
    """The held-out rows of fold ``fold`` scored by ``model`` (the unwrapped model, never DDP's wrapper: every rank
    scores its own share of the rows, and no gradient is synchronised)."""

    def __init__(self, cfg: Config, fold: int, model: torch.nn.Module, tok, device: torch.device, autocast,
                 multiple: int, *, rank: int, world: int):
        self.cfg, self.fold, self.model, self.tok, self.device = cfg, fold, model, tok, device
        self.autocast, self.multiple, self.rank, self.world = autocast, multiple, rank, world

    def score(self, ids: list[list[int]], feats: np.ndarray | None = None) -> np.ndarray:
        """(len(ids), 3) clipped probabilities on every rank: rows sharded over the ranks, then gathered. ``feats``:
        the rows' length features (``model.length_features``), else None."""
        t = self.cfg.train
        local_idx = np.arange(self.rank, len(ids), self.world)
        local_ids = [ids[i] for i in local_idx]
        bs = resolve_eval_batch_size(t.eval_batch_size, self.model, local_ids, self.device,
                                     train_batch=t.batch_size, budget_gib=t.memory_budget_gib)
        if t.eval_batch_size == "auto":
            log.info("fold %d: train.eval_batch_size=auto: %d rows per batch", self.fold, bs)
        local = predict_probs(self.model, local_ids, bs, self.tok.pad_token_id, self.device, self.autocast, None,
                              self.multiple, None if feats is None else feats[local_idx])
        return clip_probs(gather_rows(local, local_idx, len(ids), self.world))

    def interim(self, data: FoldData) -> dict:
        """Interim held-out score (early stopping of sweeps): the first ``train.interim_eval_rows`` rows by id."""
        n = min(len(data.val_ids), self.cfg.train.interim_eval_rows)
        feats = None if data.val_feats is None else data.val_feats[:n]
        probs, labels = self.score(data.val_ids[:n], feats), data.val_labels[:n]
        return {"interim_log_loss": log_loss(labels, probs), "interim_accuracy": accuracy(labels, probs),
                "interim_rows": n}

    def oof(self, data: FoldData) -> tuple[np.ndarray, np.ndarray | None, pd.DataFrame]:
        """Every held-out row: (probabilities, their TTA average or None, the OOF table). With ``train.eval_tta`` the
        rows are scored again with responses a/b swapped; p_a/p_b/p_tie stay the plain figure and the averages go
        beside them as p_a_tta/p_b_tta/p_tie_tta."""
        probs = self.score(data.val_ids, data.val_feats)
        oof = pd.DataFrame({"id": data.val_rows["id"].values, "fold": self.fold, "label": data.val_labels,
                            "p_a": probs[:, 0], "p_b": probs[:, 1], "p_tie": probs[:, 2]})
        tta = None
        if self.cfg.train.eval_tta:
            swapped = swap_responses(data.val_rows)
            tta = clip_probs(tta_average(probs, self.score(encode(swapped, self.tok, self.cfg),
                                                           swapped_length_features(data.val_feats))))
            oof[["p_a_tta", "p_b_tta", "p_tie_tta"]] = tta
        return probs, tta, oof


def held_out_scores(data: FoldData, probs: np.ndarray, tta: np.ndarray | None) -> dict:
    """The fold's scores for its metrics: log loss and accuracy (plain and TTA), the class-prior baseline from the
    training rows' labels, and the row counts."""
    labels, n = data.val_labels, len(data.val_rows)
    return {"log_loss": log_loss(labels, probs), "accuracy": accuracy(labels, probs), "n_rows": n,
            "n_train_rows": data.n_fold_rows, **data.row_counts,
            "prior_log_loss": log_loss(labels, prior_probs(data.prior_labels, n)),
            "log_loss_tta": None if tta is None else log_loss(labels, tta),
            "accuracy_tta": None if tta is None else accuracy(labels, tta)}
