"""Metrics on (N, 3) class probabilities: log loss as Kaggle scores it, accuracy, and the class-prior baseline."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss as _sk_log_loss

EPS = 1e-15  # Kaggle's clip for log loss submissions


def clip_probs(p: np.ndarray) -> np.ndarray:
    """Clip to [EPS, 1 - EPS] and renormalise each row to sum to 1, as Kaggle does before scoring."""
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return p / p.sum(axis=1, keepdims=True)


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Multi-class log loss over classes 0, 1, 2 (sklearn's), on probabilities clipped as Kaggle does."""
    return float(_sk_log_loss(np.asarray(labels), clip_probs(probs), labels=[0, 1, 2]))


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    return float((np.asarray(probs).argmax(axis=1) == np.asarray(labels)).mean())


def class_prior(labels: np.ndarray, n_classes: int = 3) -> np.ndarray:
    """Class frequencies (add-one smoothed so an unseen class is not given probability 0)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64) + 1.0
    return counts / counts.sum()


def prior_probs(train_labels: np.ndarray, n_rows: int) -> np.ndarray:
    """(n_rows, 3): every held-out row gets the training rows' class prior (the baseline a model must beat)."""
    return np.tile(class_prior(train_labels), (n_rows, 1))
