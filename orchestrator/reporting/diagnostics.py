"""Where the OOF log loss comes from: confusion matrix, reliability (calibration) bins, log loss by input length.

Everything here returns plain JSON-able numbers; the reducer stores them in report.json, and the Markdown and HTML
reports draw only from report.json, so every number on a page can be checked against that file.
"""

from __future__ import annotations

import numpy as np

from trainer_core import metrics
from trainer_core.data.tokenization import format_text


def confusion(labels: np.ndarray, probs: np.ndarray) -> list[list[int]]:
    """3x3 counts: row = true label (a, b, tie), column = argmax prediction."""
    out = np.zeros((3, 3), dtype=np.int64)
    np.add.at(out, (np.asarray(labels, dtype=np.int64), np.asarray(probs).argmax(axis=1)), 1)
    return out.tolist()


def reliability(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> dict:
    """Top-label reliability: rows binned by their highest probability (equal-width bins on [1/3, 1], the range a
    3-class top probability can take); per bin its row count, mean confidence and accuracy. ``ece`` is the
    row-weighted mean gap |accuracy - confidence| (expected calibration error). Empty bins are left out."""
    probs = np.asarray(probs)
    conf = probs.max(axis=1)
    hit = probs.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(1 / 3, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        sel = idx == b
        if not sel.any():
            continue
        c, a = float(conf[sel].mean()), float(hit[sel].mean())
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n_rows": int(sel.sum()),
                     "confidence": c, "accuracy": a})
        ece += sel.sum() * abs(a - c)
    return {"bins": bins, "ece": float(ece / max(len(conf), 1))}


def text_lengths(rows) -> np.ndarray:
    """Characters of each row's formatted model input (the template around prompt, response a and b), before
    tokenisation: a tokenizer-free measure, comparable across models."""
    return np.array([len(format_text(p, a, b)) for p, a, b in zip(rows["prompt"], rows["response_a"],
                                                                    rows["response_b"])])


def length_buckets(lengths: np.ndarray, labels: np.ndarray, probs: np.ndarray, prior: np.ndarray,
                   n_buckets: int = 5) -> list[dict]:
    """Log loss, accuracy and class-prior log loss per length bucket. Bucket edges are quantiles of ``lengths`` so
    buckets hold similar row counts; repeated edges (many equal lengths) merge buckets."""
    lengths = np.asarray(lengths)
    edges = np.unique(np.quantile(lengths, np.linspace(0, 1, n_buckets + 1)).round())
    if len(edges) < 2:
        edges = np.array([lengths.min(), lengths.max()])
    idx = np.clip(np.searchsorted(edges, lengths, side="right") - 1, 0, len(edges) - 2)
    out = []
    for b in range(len(edges) - 1):
        sel = idx == b
        if not sel.any():
            continue
        y = np.asarray(labels)[sel]
        out.append({"min_chars": int(lengths[sel].min()), "max_chars": int(lengths[sel].max()),
                    "n_rows": int(sel.sum()), "log_loss": metrics.log_loss(y, probs[sel]),
                    "accuracy": metrics.accuracy(y, probs[sel]), "prior_log_loss": metrics.log_loss(y, prior[sel])})
    return out
