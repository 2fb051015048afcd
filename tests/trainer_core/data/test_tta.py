"""A/B-swap test-time augmentation: swapping rows and mapping probabilities back is exact and symmetric."""

import numpy as np
import pandas as pd
import pytest

from trainer_core.data.tta import swap_labels, swap_probs, swap_responses, tta_average


def rows():
    return pd.DataFrame({"id": [1, 2, 3], "prompt": ["p1", "p2", "p3"], "response_a": ["short", "a" * 40, "same"],
                         "response_b": ["much longer answer", "b", "same"], "label": [0, 1, 2]})


def position_biased_scores(df: pd.DataFrame) -> np.ndarray:
    """A deterministic scorer that depends on the text *and* favours whatever is shown first (like a biased model):
    (N, 3) probabilities from the response lengths plus a constant bonus for position a."""
    la = np.array([len(x) for x in df["response_a"]], dtype=float)
    lb = np.array([len(x) for x in df["response_b"]], dtype=float)
    z = np.stack([np.log1p(la) + 0.7, np.log1p(lb), np.full(len(df), 0.5)], axis=1)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def tta(df: pd.DataFrame) -> np.ndarray:
    return tta_average(position_biased_scores(df), position_biased_scores(swap_responses(df)))


def test_swap_responses_exchanges_texts_and_labels_and_is_an_involution():
    df = rows()
    s = swap_responses(df)
    assert list(s["response_a"]) == list(df["response_b"]) and list(s["response_b"]) == list(df["response_a"])
    assert list(s["label"]) == [1, 0, 2] and list(s["prompt"]) == list(df["prompt"])
    pd.testing.assert_frame_equal(swap_responses(s), df)
    assert list(df["response_a"]) == ["short", "a" * 40, "same"]  # the input is not modified


def test_swap_probs_and_labels_agree():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    assert np.array_equal(swap_probs(p), [[0.2, 0.7, 0.1], [0.3, 0.1, 0.6]])
    assert np.array_equal(swap_labels(np.array([0, 1, 2])), [1, 0, 2])
    # the probability given to the true label is unchanged by swapping both
    y = np.array([0, 2])
    assert np.allclose(p[np.arange(2), y], swap_probs(p)[np.arange(2), swap_labels(y)])


def test_tta_is_symmetric_under_swapping_the_rows():
    df = rows()
    plain = position_biased_scores(df)
    assert not np.allclose(plain, swap_probs(position_biased_scores(swap_responses(df)))), "scorer must be biased"
    # Averaging for the swapped rows is exactly the swapped average of the original rows ...
    assert np.allclose(tta(swap_responses(df)), swap_probs(tta(df)), atol=1e-12)
    # ... so for a row whose two responses are identical, TTA gives a and b the same probability.
    same = tta(df)[2]
    assert same[0] == pytest.approx(same[1])
    assert np.allclose(tta(df).sum(1), 1.0)


def test_tta_average_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="two \\(N, 3\\) arrays"):
        tta_average(np.ones((2, 3)) / 3, np.ones((3, 3)) / 3)
