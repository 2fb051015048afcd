"""``model.persistent_reduction_max``: compiled layers keep rows of up to that many elements in registers.

Inductor computes a reduction over a row in one of two forms. "Persistent": the whole row in registers, read once.
Looped: the row in chunks, read twice; a soft-capped softmax also computes its soft-cap twice. Inductor takes the
persistent form for rows of up to 1,024 elements only when it has classed the reduction as "inner". It does not classify
a reduction over many rows (64 or more rows per SM), and then allows 64 elements. Gemma-2's soft-capped softmax over a
block of 256-1,024 keys is such a reduction. In the 9B step on an H200 its looped forward was the largest kernel after
the matrix multiplies (8.6 ms a step, docs/PERFORMANCE.md session 8). Kept persistent, the step is 1.5% faster; the same
sums in another order, so results differ by bf16 rounding (session 9).

This uses inductor's documented seam for its heuristics, ``V.set_choices_handler``, which holds for compilations in
the thread that builds the model: the forward pass compiles there. On a GPU autograd runs the backward pass, and so
compiles it, in a thread of its own, where inductor's rule stays. Inductor's cache does not see the handler, so
:func:`compile_options` also puts the limit in the cache key, as a post-grad pass that changes nothing: a run with
another limit compiles afresh instead of reusing kernels chosen under the old one.
"""
from __future__ import annotations

import sympy
from torch._inductor import config as inductor_config  # this module is imported only where layers are compiled
from torch._inductor.choices import InductorChoices
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.virtualized import V


def keeps_in_registers(reduction_numel, limit: int) -> bool:
    """Whether a row of ``reduction_numel`` elements (an int or a sympy expression) is kept whole: only a length known
    at compile time, at most ``limit``. A dynamic length keeps inductor's own rule."""
    return limit > 0 and bool(sympy.sympify(reduction_numel).is_number) and int(reduction_numel) <= limit


class PersistentRows(InductorChoices):
    """Inductor's heuristics, except that a reduction over a static row of up to ``limit`` elements is always
    persistent."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def should_use_persistent_reduction(self, features, cooperative_reduction) -> bool:
        if (not cooperative_reduction and inductor_config.triton.persistent_reductions
                and keeps_in_registers(features.reduction_numel, self.limit)):
            return True
        return super().should_use_persistent_reduction(features, cooperative_reduction)


class LimitInCacheKey(CustomGraphPass):
    """A post-grad pass that leaves the graph alone; its ``uuid`` carries the limit into inductor's cache key."""

    def __init__(self, limit: int):
        self.limit = limit

    def __call__(self, graph) -> None:
        return None

    def uuid(self) -> str:
        return f"trainer_core.fastpath.persistent_reduction:{self.limit}"


def install(limit: int) -> None:
    """Make inductor keep static rows of up to ``limit`` elements in registers for compilations in this thread; with
    ``limit`` 0, put back inductor's own heuristics if this module had replaced them. Idempotent: a handler with
    this limit already in place stays (so does a handler someone else installed, when ``limit`` is 0)."""
    if limit > 0:
        if not (isinstance(V.choices, PersistentRows) and V.choices.limit == limit):
            V.set_choices_handler(PersistentRows(limit))
    elif isinstance(V.choices, PersistentRows):
        V.set_choices_handler(InductorChoices())


def compile_options(limit: int) -> dict:
    """torch.compile options that key inductor's cache on ``limit`` (none for 0: inductor's rule, its usual key)."""
    if limit <= 0:
        return {}
    return {"post_grad_custom_post_pass": LimitInCacheKey(limit)}
