"""How an ensemble combines its members' probabilities, and how its weights are fitted (scipy.optimize).

Methods:

- ``mean``: the plain average of the members' probabilities (nothing fitted);
- ``weights``: a weighted average of probabilities, weights on the simplex (>= 0, summing to 1), fitted to minimise
  log loss;
- ``logit``: ``softmax(sum_m w_m log p_m)`` with w_m >= 0 (a weighted geometric mean; the weights' sum also acts as a
  temperature), fitted to minimise log loss.

Fitted weights are cross-fitted for the ensemble's OOF figure: fold k's rows are combined with weights fitted only on
the other folds' OOF rows, so no label of fold k chooses the weights applied to fold k (as with temperature scaling).
One more set fitted on all OOF rows is what ``orchestrator.predict`` applies to new rows.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from trainer_core import metrics

METHODS = ("mean", "weights", "logit")
LOGIT_MAX_WEIGHT = 10.0  # bound for the logit method's weights: beyond it the members are one-hot anyway


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def combine(members: list[np.ndarray], weights, method: str) -> np.ndarray:
    """(N, 3) ensemble probabilities of the members' (N, 3) probabilities with ``weights`` (one per member)."""
    w = np.asarray(weights, dtype=np.float64)
    stack = np.stack([metrics.clip_probs(p) for p in members])  # (members, N, 3)
    if method == "logit":
        return metrics.clip_probs(_softmax(np.tensordot(w, np.log(stack), axes=1)))
    return metrics.clip_probs(np.tensordot(w, stack, axes=1))


def fit_weights(labels: np.ndarray, members: list[np.ndarray], method: str) -> np.ndarray:
    """The member weights minimising the log loss of :func:`combine` on ``labels`` (``mean``: equal weights)."""
    n = len(members)
    if method == "mean" or n == 1:
        return np.full(n, 1.0 / n)
    labels = np.asarray(labels, dtype=np.int64)
    rows = np.arange(len(labels))
    stack = np.stack([metrics.clip_probs(p) for p in members])
    if method == "weights":
        # Simplex weights as a softmax of free parameters: an unconstrained smooth problem for L-BFGS.
        picked = stack[:, rows, labels]  # (members, N): each member's probability of the true label

        def nll(theta):
            return float(-np.log(np.clip(_softmax(theta) @ picked, metrics.EPS, None)).mean())

        res = minimize(nll, np.zeros(n), method="L-BFGS-B")
        return _softmax(res.x)
    if method == "logit":
        logs = np.log(stack)

        def nll(w):
            z = np.tensordot(w, logs, axes=1)
            z = z - z.max(axis=1, keepdims=True)
            return float(-(z[rows, labels] - np.log(np.exp(z).sum(axis=1))).mean())

        res = minimize(nll, np.full(n, 1.0 / n), method="L-BFGS-B", bounds=[(0.0, LOGIT_MAX_WEIGHT)] * n)
        return res.x
    raise ValueError(f"unknown ensemble method {method!r}; expected one of {', '.join(METHODS)}")


def cross_fit(labels: np.ndarray, members: list[np.ndarray], folds: np.ndarray,
              method: str) -> tuple[np.ndarray, dict[int, list[float]]]:
    """(ensemble OOF (N, 3), {fold: weights applied to it}): fold k's weights are fitted on the other folds' rows
    only. With a single fold there is nothing else to fit on, so it gets equal weights."""
    labels, folds = np.asarray(labels), np.asarray(folds)
    out = np.empty((len(labels), 3))
    weights: dict[int, list[float]] = {}
    for k in np.unique(folds):
        held = folds == k
        w = (fit_weights(labels[~held], [p[~held] for p in members], method) if (~held).any()
             else np.full(len(members), 1.0 / len(members)))
        weights[int(k)] = [float(x) for x in w]
        out[held] = combine([p[held] for p in members], w, method)
    return out, weights
