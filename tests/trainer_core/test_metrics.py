import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss

from trainer_core import metrics as M


def test_log_loss_equals_sklearn_on_clipped_probs():
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1, 1], size=200)
    y = rng.integers(0, 3, size=200)
    assert M.log_loss(y, p) == pytest.approx(sk_log_loss(y, p, labels=[0, 1, 2]), rel=1e-12)


def test_clipping_bounds_a_confident_mistake():
    p = np.array([[1.0, 0.0, 0.0]])
    ll = M.log_loss(np.array([1]), p)
    assert np.isfinite(ll) and ll == pytest.approx(-np.log(M.EPS / (1 + 2 * M.EPS)), rel=1e-6)
    assert np.allclose(M.clip_probs(p).sum(1), 1.0)


def test_clip_is_idempotent():
    p = M.clip_probs(np.random.default_rng(1).dirichlet([0.1, 0.1, 0.1], size=50))
    assert np.allclose(M.clip_probs(p), p, rtol=0, atol=1e-15)


def test_accuracy_and_prior():
    y = np.array([0, 1, 1, 2])
    p = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    assert M.accuracy(y, p) == 0.75
    prior = M.class_prior(np.array([0, 0, 1]))
    assert np.allclose(prior, [3 / 6, 2 / 6, 1 / 6])  # add-one smoothing keeps the unseen tie class above 0
    assert M.prior_probs(np.array([0, 1]), 3).shape == (3, 3)
