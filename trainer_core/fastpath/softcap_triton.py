"""The Triton kernels of :mod:`trainer_core.fastpath.softcap_softmax` (imported only where Triton is installed, on
first use).

One program per row of scores: the row (at most ``MAX_KEYS`` long) is loaded once, soft-capped, masked and
normalised in fp32; the backward program recomputes the probabilities from the saved scores instead of reading them.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _tanh(x):
    return libdevice.tanh(x)  # what torch.compile's kernels call for torch.tanh


@triton.jit
def _probs(s_ptr, m_ptr, row, length, heads_rows, rows, m_batch, m_row, scaling, softcap,
           HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    ok = cols < length
    s = tl.load(s_ptr + row * length + cols, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + (row // heads_rows) * m_batch + (row % rows) * m_row + cols, mask=ok,
                other=0.0).to(tl.float32)
    x = s * scaling
    capped = x
    if HAS_CAP:
        capped = _tanh(x / softcap)
        x = capped * softcap
    y = tl.where(ok, x + m, float("-inf"))
    e = tl.exp(y - tl.max(y, axis=0))
    return e / tl.sum(e, axis=0), capped, cols, ok


@triton.jit
def forward(s_ptr, m_ptr, p_ptr, length, heads_rows, rows, m_batch, m_row, scaling, softcap,
            HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    p, _, cols, ok = _probs(s_ptr, m_ptr, row, length, heads_rows, rows, m_batch, m_row, scaling, softcap,
                            HAS_CAP, BLOCK)
    tl.store(p_ptr + row * length + cols, p.to(p_ptr.dtype.element_ty), mask=ok)


@triton.jit
def backward(g_ptr, s_ptr, m_ptr, d_ptr, length, heads_rows, rows, m_batch, m_row, scaling, softcap,
             HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    p, capped, cols, ok = _probs(s_ptr, m_ptr, row, length, heads_rows, rows, m_batch, m_row, scaling, softcap,
                                 HAS_CAP, BLOCK)
    g = tl.load(g_ptr + row * length + cols, mask=ok, other=0.0).to(tl.float32)
    dy = p * (g - tl.sum(g * p, axis=0))
    if HAS_CAP:
        dy = dy * (1 - capped * capped)
    tl.store(d_ptr + row * length + cols, (dy * scaling).to(d_ptr.dtype.element_ty), mask=ok)
