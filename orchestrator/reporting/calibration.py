"""Temperature scaling of OOF probabilities: one scalar T, ``softmax(log p / T)``, fitted to minimise log loss.

T > 1 softens over-confident probabilities, T < 1 sharpens timid ones; the argmax (so accuracy) never changes. One
parameter fitted on thousands of rows barely overfits, but it is still fitted on labels, so the reported figure is
cross-fitted: fold k's rows are scaled by a T fitted on the *other* folds' OOF rows only, so no row's own label (nor
any label of its fold) chooses the temperature applied to it. The models that predicted those other folds were
trained partly on fold k, as every CV model is; the temperature fit itself never sees fold k.

A separate global T fitted on all OOF rows is what ``orchestrator.predict`` applies to new rows; it is not used to
score the OOF rows (that would grade the temperature on its own training data).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from trainer_core import metrics

# Search range for T. Outside it the fit is either degenerate (all rows at the prior) or the probabilities are
# already one-hot; a T at a bound is reported as-is so a reader can see it.
T_MIN, T_MAX = 0.05, 20.0


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """(N, 3) probabilities rescaled as ``softmax(log p / T)``; T = 1 returns the (clipped) input."""
    logp = np.log(metrics.clip_probs(probs)) / float(temperature)  # (N, 3) log-probabilities up to a per-row constant
    logp -= logp.max(axis=1, keepdims=True)  # stable softmax
    p = np.exp(logp)
    return metrics.clip_probs(p / p.sum(axis=1, keepdims=True))


def fit_temperature(labels: np.ndarray, probs: np.ndarray) -> float:
    """The T in [T_MIN, T_MAX] that minimises the log loss of ``apply_temperature(probs, T)`` on ``labels``."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("fit_temperature: no rows")
    logp = np.log(metrics.clip_probs(probs))
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float(-(z[rows, labels] - np.log(np.exp(z).sum(axis=1))).mean())

    # Log loss is smooth and (in practice) unimodal in log T; a bounded scalar search needs no gradient.
    res = minimize_scalar(nll, bounds=(np.log(T_MIN), np.log(T_MAX)), method="bounded",
                          options={"xatol": 1e-6})
    return float(np.exp(res.x))


def cross_fit(labels: np.ndarray, probs: np.ndarray, folds: np.ndarray) -> tuple[np.ndarray, dict[int, float]]:
    """Cross-fitted calibration: (calibrated (N, 3) probabilities, {fold: T used for that fold's rows}).

    The T for fold k is fitted on the rows of every other fold; with a single fold there is nothing to fit it on,
    so that fold keeps T = 1."""
    labels, folds = np.asarray(labels), np.asarray(folds)
    out = np.empty((len(labels), 3))
    temps: dict[int, float] = {}
    for k in np.unique(folds):
        held = folds == k
        temps[int(k)] = fit_temperature(labels[~held], probs[~held]) if (~held).any() else 1.0
        out[held] = apply_temperature(probs[held], temps[int(k)])
    return out, temps


def calibrate_by_fold(probs: np.ndarray, folds: np.ndarray, temps: dict) -> np.ndarray:
    """Apply the per-fold temperatures of :func:`cross_fit` (e.g. as read back from report.json) to OOF rows."""
    out = np.empty((len(probs), 3))
    folds = np.asarray(folds)
    for k, t in temps.items():
        sel = folds == int(k)
        out[sel] = apply_temperature(np.asarray(probs)[sel], float(t))
    return out
