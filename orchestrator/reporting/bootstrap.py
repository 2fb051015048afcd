"""Error bars for log losses: bootstrap over rows (scipy.stats.bootstrap, fixed seed) of per-row losses.

The OOF log loss is the mean of per-row losses ``-log p(label)``, so resampling rows and recomputing the mean gives
its sampling spread; a paired comparison resamples the per-row *differences* of two runs on the same rows, which
cancels the row-to-row difficulty both runs share and is far tighter than comparing two separate intervals.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import bootstrap

from trainer_core import metrics

SEED = 20240  # fixed: the same OOF rows always give the same interval
N_RESAMPLES = 2000
BATCH = 50  # resamples per vectorised batch: bounds memory to BATCH x rows floats on a 55k-row OOF


def row_losses(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-row log loss on Kaggle-clipped probabilities; their mean is :func:`trainer_core.metrics.log_loss`."""
    p = metrics.clip_probs(probs)
    labels = np.asarray(labels, dtype=np.int64)
    return -np.log(p[np.arange(len(labels)), labels])


def mean_ci95(values: np.ndarray) -> list[float]:
    """[low, high] percentile-bootstrap 95% interval of the mean of ``values`` (rows resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2 or np.all(values == values[0]):
        return [float(values.mean()), float(values.mean())]  # nothing to resample: the mean is all there is
    res = bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=N_RESAMPLES, method="percentile",
                    batch=BATCH, vectorized=True, random_state=np.random.default_rng(SEED))
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def log_loss_ci95(labels: np.ndarray, probs: np.ndarray) -> list[float]:
    """95% bootstrap interval of the log loss of ``probs`` over rows."""
    return mean_ci95(row_losses(labels, probs))


def fold_std(fold_log_losses: list[float]) -> float | None:
    """Sample standard deviation (ddof=1) of per-fold log losses; None with fewer than two folds."""
    return float(np.std(fold_log_losses, ddof=1)) if len(fold_log_losses) >= 2 else None
