"""Temperature scaling: it repairs over- and under-confident probabilities, never changes the argmax, and the
cross-fitted figure never lets a fold's own rows choose its temperature."""

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss

from orchestrator.reporting.calibration import apply_temperature, calibrate_by_fold, cross_fit, fit_temperature


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def calibrated_world(n=3000, seed=0):
    """True class probabilities q and labels drawn from them: q itself is perfectly calibrated."""
    rng = np.random.default_rng(seed)
    q = softmax(rng.normal(0, 1.2, size=(n, 3)))
    labels = np.array([rng.choice(3, p=row) for row in q])
    return q, labels


@pytest.mark.parametrize("sharpness", [3.0, 0.4])
def test_temperature_undoes_over_and_under_confidence(sharpness):
    q, y = calibrated_world()
    distorted = softmax(sharpness * np.log(q))  # sharpness 3: deliberately over-confident; 0.4: timid
    t = fit_temperature(y, distorted)
    assert t == pytest.approx(sharpness, rel=0.15)  # the fit recovers the distortion
    fixed = apply_temperature(distorted, t)
    before = sk_log_loss(y, distorted, labels=[0, 1, 2])
    after = sk_log_loss(y, fixed, labels=[0, 1, 2])
    assert after < before - 0.02
    assert after == pytest.approx(sk_log_loss(y, q, labels=[0, 1, 2]), abs=0.01)
    assert np.array_equal(fixed.argmax(1), distorted.argmax(1))


def test_temperature_one_is_identity_and_calibrated_input_keeps_t_near_one():
    q, y = calibrated_world(seed=1)
    assert np.allclose(apply_temperature(q, 1.0), q)
    assert fit_temperature(y, q) == pytest.approx(1.0, abs=0.12)


def test_cross_fit_uses_only_the_other_folds():
    q, y = calibrated_world(n=1500, seed=2)
    p = softmax(2.5 * np.log(q))
    folds = np.arange(len(y)) % 5
    cal, temps = cross_fit(y, p, folds)
    assert sorted(temps) == [0, 1, 2, 3, 4]
    for k in range(5):  # each fold's T is exactly the fit on the other folds' rows
        assert temps[k] == pytest.approx(fit_temperature(y[folds != k], p[folds != k]))
    # Wreck fold 0's probabilities and labels: fold 0's own temperature must not move; every other fold's does.
    p2, y2 = p.copy(), y.copy()
    p2[folds == 0] = softmax(8 * np.log(q[folds == 0]))
    y2[folds == 0] = (y[folds == 0] + 1) % 3
    _, temps2 = cross_fit(y2, p2, folds)
    assert temps2[0] == pytest.approx(temps[0], rel=1e-9)
    assert all(abs(temps2[k] - temps[k]) > 1e-3 for k in range(1, 5))
    assert sk_log_loss(y, cal, labels=[0, 1, 2]) < sk_log_loss(y, p, labels=[0, 1, 2])
    # the per-fold temperatures, read back (as report.json stores them), reproduce the calibrated rows
    assert np.allclose(calibrate_by_fold(p, folds, {str(k): t for k, t in temps.items()}), cal)
