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


def grouped_mean_ci95(values: np.ndarray, groups: np.ndarray) -> list[float]:
    """[low, high] percentile-bootstrap 95% interval of the mean of ``values`` when rows of one group (say, rows that
    share a prompt) are not independent: whole groups are resampled with replacement and the mean is taken over the
    rows they bring. scipy.stats.bootstrap resamples its inputs element by element and has no cluster option, so the
    group indices are drawn here with numpy's Generator (fixed seed) and each resample's mean is its groups' summed
    values over their summed row counts."""
    values = np.asarray(values, dtype=np.float64)
    codes, _ = _factorize(groups)
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    if n_groups < 2 or np.all(values == values[0]):
        return [float(values.mean()), float(values.mean())]
    sums = np.bincount(codes, weights=values, minlength=n_groups)
    counts = np.bincount(codes, minlength=n_groups).astype(np.float64)
    rng = np.random.default_rng(SEED)
    means = np.empty(N_RESAMPLES)
    for start in range(0, N_RESAMPLES, BATCH):
        picks = rng.integers(0, n_groups, size=(min(BATCH, N_RESAMPLES - start), n_groups))  # (batch, groups)
        means[start:start + len(picks)] = sums[picks].sum(1) / counts[picks].sum(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return [float(low), float(high)]


def _factorize(groups) -> tuple[np.ndarray, np.ndarray]:
    uniques, codes = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    return codes.reshape(-1), uniques
