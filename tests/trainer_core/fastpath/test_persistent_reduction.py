"""model.persistent_reduction_max: inductor's persistent-reduction choice for static rows, and its cache key."""
import re

import pytest
import sympy
import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.virtualized import V

from trainer_core.fastpath import persistent_reduction
from trainer_core.fastpath.persistent_reduction import PersistentRows, keeps_in_registers


@pytest.fixture(autouse=True)
def inductors_own_heuristics():
    yield
    V.set_choices_handler(InductorChoices())


class Features:
    """What the handler reads of inductor's kernel features."""

    def __init__(self, reduction_numel):
        self.reduction_numel = reduction_numel


def test_only_static_rows_up_to_the_limit_are_kept_in_registers():
    assert keeps_in_registers(1024, 1024) and keeps_in_registers(sympy.Integer(256), 1024)
    assert not keeps_in_registers(sympy.Integer(1025), 1024)
    assert not keeps_in_registers(sympy.Symbol("s0", positive=True, integer=True), 1024)  # a dynamic length
    assert not keeps_in_registers(sympy.Integer(256), 0)


def test_the_handler_keeps_static_rows_and_leaves_the_rest_to_inductor(monkeypatch):
    asked = []

    def inductors_rule(features, cooperative_reduction):
        asked.append(features.reduction_numel)
        return "inductor's answer"
    monkeypatch.setattr(InductorChoices, "should_use_persistent_reduction", staticmethod(inductors_rule))
    handler = PersistentRows(1024)
    assert handler.should_use_persistent_reduction(Features(sympy.Integer(768)), False) is True
    assert asked == []
    s0 = sympy.Symbol("s0", positive=True, integer=True)
    for features, cooperative in ((Features(s0), False), (Features(sympy.Integer(2048)), False),
                                  (Features(sympy.Integer(768)), True)):  # cooperative reductions split the row
        assert handler.should_use_persistent_reduction(features, cooperative) == "inductor's answer"
    with inductor_config.patch({"triton.persistent_reductions": False}):  # inductor's switch still turns it off
        assert handler.should_use_persistent_reduction(Features(sympy.Integer(768)), False) == "inductor's answer"
    assert asked == [s0, 2048, 768, 768]


def test_install_sets_the_limit_and_zero_puts_inductors_rule_back():
    persistent_reduction.install(1024)
    assert isinstance(V.choices, PersistentRows) and V.choices.limit == 1024
    persistent_reduction.install(0)
    assert type(V.choices) is InductorChoices
    assert persistent_reduction.compile_options(0) == {}


@pytest.mark.slow  # torch.compile on the CPU, four compilations
def test_the_limit_is_part_of_inductors_cache_key(tmp_path, monkeypatch):
    """Compiled code of one limit is never reused for another (inductor's cache does not see the handler itself);
    the same limit is reused."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))

    def softcapped_softmax(x):
        return torch.softmax(torch.tanh(x / 50) * 50, dim=-1)
    x = torch.randn(8, 300)
    seen = []
    with inductor_config.patch({"fx_graph_cache": True}):
        for limit in (512, 1024, 512, 0):
            torch._dynamo.reset()
            counters.clear()
            out = torch.compile(softcapped_softmax, options=persistent_reduction.compile_options(limit) or None)(x)
            torch.testing.assert_close(out, softcapped_softmax(x))
            seen.append((counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]))
    torch._dynamo.reset()
    assert seen == [(0, 1), (0, 1), (1, 0), (0, 1)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's Triton code: CUDA only")
def test_on_cuda_the_softcapped_softmax_over_many_rows_becomes_persistent():
    """The attention-shaped reduction (16,384 rows of 256 keys): looped under inductor's rule, persistent with the
    limit, the same results to bf16 rounding."""
    from torch._inductor.utils import run_and_get_code

    def softcapped_softmax(x, mask):
        return torch.softmax(torch.tanh(x / 50) * 50 + mask, dim=-1, dtype=torch.float32).to(x.dtype)
    x = torch.randn(4, 8, 2, 256, 256, device="cuda", dtype=torch.bfloat16) * 30
    mask = torch.zeros(4, 1, 1, 256, 256, device="cuda").masked_fill(torch.ones(256, 256, device="cuda").triu(1).bool(),
                                                                     float("-inf"))
    outs, codes = {}, {}
    for limit in (0, 1024):
        torch._dynamo.reset()
        persistent_reduction.install(limit)
        fn = torch.compile(softcapped_softmax, options=persistent_reduction.compile_options(limit) or None)
        outs[limit], code = run_and_get_code(fn, x, mask)
        codes[limit] = "\n".join(code)
    torch._dynamo.reset()
    heuristics = {limit: sorted(set(re.findall(r"@triton_heuristics\.(\w+)\(", code))) for limit, code in codes.items()}
    assert "persistent_reduction" not in heuristics[0] and "persistent_reduction" in heuristics[1024], heuristics
    torch.testing.assert_close(outs[1024], outs[0])  # the same sums in another order: bf16 rounding apart at most
