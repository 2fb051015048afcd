"""A/B-swap test-time augmentation: score each row as given and with response a and b swapped, then average.

A preference model should not care which response is shown first, but a trained one does a little (position bias).
Scoring the swapped row and mapping its probabilities back (its "a wins" is the original's "b wins"; a tie stays a
tie) gives a second, differently biased opinion of the same row; their mean cancels the part of the bias that flips
with the order. Pure functions, no model or Ray here: the caller scores, these only swap and combine.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# Column order of every (N, 3) probability array in this project: p_a, p_b, p_tie (labels 0, 1, 2).
SWAP_CLASSES = [1, 0, 2]


def swap_responses(rows: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``rows`` with ``response_a`` and ``response_b`` exchanged, and ``label`` (if present) swapped to
    match: a row labelled "a wins" becomes "b wins"; ties stay ties."""
    out = rows.copy()
    out["response_a"], out["response_b"] = rows["response_b"].values, rows["response_a"].values
    if "label" in out.columns:
        out["label"] = swap_labels(rows["label"].to_numpy())
    return out


def swap_labels(labels: np.ndarray) -> np.ndarray:
    """0 (a) <-> 1 (b); 2 (tie) unchanged."""
    return np.asarray(SWAP_CLASSES)[np.asarray(labels, dtype=np.int64)]


def swap_probs(probs: np.ndarray) -> np.ndarray:
    """(N, 3) p_a, p_b, p_tie of a swapped row -> the same opinion about the original row (p_a <-> p_b)."""
    return np.asarray(probs)[:, SWAP_CLASSES]


def tta_average(probs: np.ndarray, swapped_probs: np.ndarray) -> np.ndarray:
    """(N, 3): the mean of the plain probabilities and the swapped row's probabilities mapped back.

    ``swapped_probs[i]`` must be the model's output for row i with its responses swapped. The result is symmetric:
    averaging for the swapped rows gives exactly ``swap_probs`` of averaging for the original rows."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != np.shape(swapped_probs) or probs.ndim != 2 or probs.shape[1] != 3:
        raise ValueError(f"tta_average: expected two (N, 3) arrays, got {probs.shape} and {np.shape(swapped_probs)}")
    return 0.5 * (probs + swap_probs(np.asarray(swapped_probs, dtype=np.float64)))
