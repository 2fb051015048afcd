import numpy as np
import pytest

from trainer_core import metrics


def test_log_loss_matches_a_hand_computed_value():
    """Mean of -ln p(true class), by hand: rows that do not sum to 1 are renormalised first (Kaggle's scoring), and
    all three classes count even when the labels hold only some of them."""
    y = np.array([0, 1, 2])
    p = np.array([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.6]])  # the last row sums to 0.8: 0.125, 0.125, 0.75
    assert metrics.log_loss(y, p) == pytest.approx(-(np.log(0.5) + np.log(0.6) + np.log(0.75)) / 3, rel=1e-12)
    only_a = np.array([0, 0])
    assert metrics.log_loss(only_a, p[:2]) == pytest.approx(-(np.log(0.5) + np.log(0.2)) / 2, rel=1e-12)


def test_clipping_bounds_a_confident_mistake():
    p = np.array([[1.0, 0.0, 0.0]])
    ll = metrics.log_loss(np.array([1]), p)
    assert np.isfinite(ll) and ll == pytest.approx(-np.log(metrics.EPS / (1 + 2 * metrics.EPS)), rel=1e-6)
    assert np.allclose(metrics.clip_probs(p).sum(1), 1.0)


def test_clip_is_idempotent():
    p = metrics.clip_probs(np.random.default_rng(1).dirichlet([0.1, 0.1, 0.1], size=50))
    assert np.allclose(metrics.clip_probs(p), p, rtol=0, atol=1e-15)


def test_accuracy_and_prior():
    y = np.array([0, 1, 1, 2])
    p = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    assert metrics.accuracy(y, p) == 0.75
    prior = metrics.class_prior(np.array([0, 0, 1]))
    assert np.allclose(prior, [3 / 6, 2 / 6, 1 / 6])  # add-one smoothing keeps the unseen tie class above 0
    assert metrics.prior_probs(np.array([0, 1]), 3).shape == (3, 3)
