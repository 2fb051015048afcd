"""``model.length_features``: a learned length term in the head, fed each row's untruncated lengths.

A model that reads 128 (or 1,024) tokens of a response cannot see how long a long response is, and length is the
strongest single signal in arena labels. The six inputs are :func:`trainer_core.data.text.length_features`: log(1 +
characters) and log(1 + tokens) of the prompt and of each response, counted before truncation.

- Pairwise head (:class:`PairwiseLengthTerm`): a linear term in each side's score, the same weights for a and b, of
  that side's own lengths and their difference to the other side (``[c_own, t_own, c_own - c_other, t_own -
  t_other]``), plus a linear term in the tie logit of features that do not change when a and b swap (``|l_a - l_b|``,
  ``l_prompt``, ``(l_a + l_b) / 2``, with ``l`` the mean of a part's log characters and log tokens: similar and short
  answers tie more often). The model stays exactly symmetric in a and b.
- Joint head (:class:`JointLengthTerm`): the lengths, a - b and ``|l_a - l_b|`` as extra inputs of the classifier: a
  linear term added to its three logits (a linear layer over [pooled state, lengths] is exactly that sum).

Before training, :func:`fit_length_term` fits the term (and the pairwise tie term) on the fold's training rows alone
with the text's contribution at zero: an L2-penalised logistic fit, the penalty scikit-learn's default (C = 1:
``|w|^2 / 2`` over the rows) that the report's length baseline uses. Fine-tuning then starts where length alone
stands and the encoder learns what the text adds: at the demo's lr 1e-4 and 200 steps, Adam moves a weight by about
0.02, far too little to learn a length coefficient of order 0.5 from zero. Only training rows are read: honest CV.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

N_LENGTH_FEATURES = 6  # trainer_core.data.text.LENGTH_FEATURES
FIT_MAX_ITER = 500


def _parts(f: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(chars p, a, b, tokens p, a, b) columns of (B, 6) features."""
    if f.dim() != 2 or f.shape[1] != N_LENGTH_FEATURES:
        raise ValueError(f"length features: expected (B, {N_LENGTH_FEATURES}), got {tuple(f.shape)}")
    return f.unbind(-1)


def pairwise_inputs(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, 2, 4) per-side inputs of a and b, (B, 3) swap-invariant tie inputs) of (B, 6) length features."""
    cp, ca, cb, tp, ta, tb = _parts(f)
    side = torch.stack([torch.stack([ca, ta, ca - cb, ta - tb], -1), torch.stack([cb, tb, cb - ca, tb - ta], -1)], 1)
    lp, la, lb = (cp + tp) / 2, (ca + ta) / 2, (cb + tb) / 2
    return side, torch.stack([(la - lb).abs(), lp, (la + lb) / 2], -1)


def joint_inputs(f: torch.Tensor) -> torch.Tensor:
    """(B, 9) inputs of the joint classifier: the six lengths, a - b in characters and tokens, and ``|l_a - l_b|``."""
    cp, ca, cb, tp, ta, tb = _parts(f)
    gap = ((ca + ta) / 2 - (cb + tb) / 2).abs()
    return torch.stack([cp, ca, cb, tp, ta, tb, ca - cb, ta - tb, gap], -1)


class PairwiseLengthTerm(torch.nn.Module):
    """Side weights (4) and tie weights (3), zero until fitted."""

    def __init__(self):
        super().__init__()
        self.side = torch.nn.Parameter(torch.zeros(4))
        self.tie = torch.nn.Parameter(torch.zeros(3))

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, 2) added to s_a and s_b, (B, 1) added to the tie logit), in float32 whatever the autocast."""
        side, tie = pairwise_inputs(f.float())
        return (side * self.side.float()).sum(-1), (tie * self.tie.float()).sum(-1, keepdim=True)


class JointLengthTerm(torch.nn.Module):
    """A (3, 9) weight and a (3,) bias over :func:`joint_inputs`, zero until fitted."""

    def __init__(self, n_labels: int = 3):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n_labels, 9))
        self.bias = torch.nn.Parameter(torch.zeros(n_labels))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """(B, 3) added to the classifier's logits, in float32."""
        return joint_inputs(f.float()) @ self.weight.float().T + self.bias.float()


def fit_l2(params: list[torch.nn.Parameter], logits_of: Callable[[list[torch.Tensor]], torch.Tensor],
           labels: np.ndarray | torch.Tensor, penalised: list[bool]) -> float:
    """Set ``params`` to the minimiser of mean cross-entropy of ``logits_of(params)`` plus ``|w|^2 / (2 N)`` over the
    ``penalised`` ones (scikit-learn's C = 1), by L-BFGS in float64 on the CPU from zero; returns the mean
    cross-entropy reached. Deterministic: every rank of a fold fits the same numbers (DDP then broadcasts rank 0's)."""
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long).cpu()
    xs = [torch.zeros(p.shape, dtype=torch.float64, requires_grad=True) for p in params]
    opt = torch.optim.LBFGS(xs, max_iter=FIT_MAX_ITER, line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                            tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits_of(xs), y)
        loss = loss + sum(x.square().sum() for x, pen in zip(xs, penalised) if pen) / (2 * len(y))
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        for p, x in zip(params, xs):
            p.copy_(x.to(p.dtype))
        return float(torch.nn.functional.cross_entropy(logits_of(xs), y))


def fit_pairwise(term: PairwiseLengthTerm, tie: torch.nn.Parameter, feats: np.ndarray, labels) -> float:
    """:func:`fit_l2` of the Bradley-Terry-with-ties logits with the text scores at zero: ``[w.side_a, w.side_b,
    tie + (w.side_a + w.side_b) / 2 + v.tie_inputs]``; the tie intercept is not penalised."""
    side, sym = pairwise_inputs(torch.as_tensor(feats, dtype=torch.float64))

    def logits(xs):
        w, v, nu = xs
        s = (side * w).sum(-1)
        return torch.cat([s, nu + s.mean(1, keepdim=True) + (sym * v).sum(-1, keepdim=True)], 1)

    return fit_l2([term.side, term.tie, tie], logits, labels, [True, True, False])


def fit_joint(term: JointLengthTerm, feats: np.ndarray, labels) -> float:
    """:func:`fit_l2` of a multinomial logistic regression on :func:`joint_inputs` (the bias not penalised)."""
    x = joint_inputs(torch.as_tensor(feats, dtype=torch.float64))
    return fit_l2([term.weight, term.bias], lambda xs: x @ xs[0].T + xs[1], labels, [True, False])
