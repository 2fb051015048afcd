"""Batched prediction of class probabilities."""

from __future__ import annotations

import numpy as np
import torch

from trainer_core.batching import collate


@torch.no_grad()
def predict_probs(model, ids: list[list[int]], batch_size: int, pad_id: int, device: torch.device,
                  autocast) -> np.ndarray:
    """(N, 3) float64 softmax probabilities, rows in input order; batches are formed longest-first to cut padding."""
    was_training = model.training
    model.eval()
    order = np.argsort([-len(x) for x in ids], kind="stable")
    out = np.zeros((len(ids), 3), dtype=np.float64)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        input_ids, mask = collate([ids[j] for j in idx], pad_id, device)
        with autocast():
            logits = model(input_ids=input_ids, attention_mask=mask).logits  # (B, 3)
        out[idx] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    model.train(was_training)
    return out
