"""The length-only baseline: a logistic regression on response lengths, cross-fitted over the run's folds.

Arena labels lean heavily on length (longer answers win more often, similar lengths tie more often), so a model
that does not beat this baseline has learned little beyond counting characters. For each fold k the regression is
fitted on the rows of every other fold (the same rows fold k's model trained on) and scores fold k's held-out rows:
no held-out label ever fits the baseline that scores it, so its OOF log loss is as honest as the model's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from trainer_core import metrics

FEATURE_NAMES = ("log_chars_prompt", "log_chars_a", "log_chars_b", "chars_a_minus_b", "log_ratio_a_b",
                 "abs_log_ratio_a_b")
FEATURE_DOC = ("characters of prompt, response a and response b (log1p), a - b, log((1+a)/(1+b)) and its "
               "absolute value (ties: lengths alike)")


def length_features(rows: pd.DataFrame) -> np.ndarray:
    """(N, 6) features of :data:`FEATURE_NAMES` from the joined texts (``prompt``, ``response_a``, ``response_b``)."""
    chars = {c: rows[c].fillna("").str.len().to_numpy(dtype=np.float64) for c in ("prompt", "response_a",
                                                                               "response_b")}
    a, b = chars["response_a"], chars["response_b"]
    ratio = np.log1p(a) - np.log1p(b)
    # a - b in thousands of characters: the scaler standardises it anyway, this only keeps the raw values readable.
    return np.column_stack([np.log1p(chars["prompt"]), np.log1p(a), np.log1p(b), (a - b) / 1000.0, ratio,
                            np.abs(ratio)])


def fit_predict(train: pd.DataFrame, held: pd.DataFrame) -> np.ndarray:
    """(len(held), 3) probabilities of a logistic regression fitted on ``train`` (needs ``label``)."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, tol=1e-8, max_iter=2000))  # tight tol: converged
    y = train["label"].to_numpy()
    model.fit(length_features(train), y)
    probs = np.zeros((len(held), 3))
    probs[:, model.classes_] = model.predict_proba(length_features(held))
    # A class absent from the training rows (ties in a small sample) would get probability 0, and one held-out row of
    # it a clipped loss of 34.5; it gets its add-one smoothed frequency instead, as the class-prior baseline does.
    absent = np.setdiff1d(np.arange(3), model.classes_)
    if len(absent):
        prior = metrics.class_prior(y)
        probs *= 1.0 - prior[absent].sum()
        probs[:, absent] = prior[absent]
    return probs


def cross_fitted(oof: pd.DataFrame, rows: pd.DataFrame, folds: list[int]) -> np.ndarray:
    """(len(oof), 3) baseline probabilities aligned with ``oof`` (columns id, fold): each fold k's rows scored by a
    regression fitted on ``rows`` outside fold k (``rows``: the run's data.parquet, with text, label and fold)."""
    texts = oof[["id"]].merge(rows[["id", "prompt", "response_a", "response_b"]], on="id", how="left",
                              validate="one_to_one")
    out = np.zeros((len(oof), 3))
    fold_of = oof["fold"].to_numpy()
    for k in folds:
        sel = fold_of == k
        out[sel] = fit_predict(rows[rows["fold"] != k], texts[sel])
    return out
