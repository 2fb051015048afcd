"""compile_layers hands torch.compile the options a kind of compilation needs, the user's on top."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
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


KEYS = """
import sys
if sys.argv[1] == "other-first":
    import a_module_imported_first
    a_module_imported_first.load()
import torch
from torch._inductor.codecache import FxGraphCachePickler

from trainer_core.fastpath.compile import stable_cache_keys

def key():  # inductor's cache key of a tensor input: its metadata, pickled
    return FxGraphCachePickler(torch.fx.symbolic_trace(torch.nn.Identity())).get_hash(torch.ones(2, 3))

plain = key()
stable_cache_keys()
assert pickle.loads(pickle.dumps(torch.channels_last)) is torch.channels_last
print(plain, key())
"""


def test_a_graph_is_keyed_alike_whatever_module_a_process_imported_first(tmp_path):
    """Two processes, one importing torch first, the other a module that imports torch later, into its globals (a
    pattern of libraries that import torch only when used, such as Ray: in a Ray Train worker on an H100 every graph
    was keyed apart from a plain process's). Pickle names ``torch.contiguous_format`` after the first module in
    ``sys.modules`` where it resolves, so the two keys differ; with :func:`compile_mod.stable_cache_keys` they match."""
    (tmp_path / "a_module_imported_first.py").write_text("def load():\n    global torch\n    import torch\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}
    keys = {}
    for order in ("torch-first", "other-first"):
        out = subprocess.run([sys.executable, "-c", "import pickle\n" + KEYS, order], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        keys[order] = out.stdout.split()
    assert keys["torch-first"][0] != keys["other-first"][0]  # torch's own keys: apart
    assert keys["torch-first"][1] == keys["other-first"][1]
