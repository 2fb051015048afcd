"""compile_layers hands torch.compile the options a kind of compilation needs, the user's on top."""

import pytest

from tests.tiny_gemma import tiny_gemma2_classifier
from trainer_core.fastpath import compile as compile_mod


def _options_given(monkeypatch, **kw):
    seen = []
    model = tiny_gemma2_classifier()
    for layer in compile_mod.decoder_layers(model):
        monkeypatch.setattr(layer, "compile", lambda dynamic, options, _seen=seen: _seen.append((dynamic, options)))
    assert compile_mod.compile_layers(model, **kw) == len(seen) > 0
    assert len({repr(s) for s in seen}) == 1  # every layer the same way
    return seen[0]


def test_dynamic_layers_skip_the_tiling_analysis_that_asserted_on_symbolic_sizes(monkeypatch):
    dynamic, options = _options_given(monkeypatch, dynamic=True)
    assert dynamic is True and options == {"triton.coalesce_tiling_analysis": False}


@pytest.mark.parametrize("dynamic", [False, None])
def test_static_layers_keep_inductors_defaults(monkeypatch, dynamic):
    assert _options_given(monkeypatch, dynamic=dynamic) == (dynamic, None)


def test_the_users_options_win(monkeypatch):
    _, options = _options_given(monkeypatch, dynamic=True,
                                options={"triton.coalesce_tiling_analysis": True, "max_autotune": True})
    assert options == {"triton.coalesce_tiling_analysis": True, "max_autotune": True}
