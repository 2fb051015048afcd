"""Regional compilation: ``torch.compile`` of each decoder layer in place (``model.compile``).

Layers compile lazily, at their first call, and layers whose modules have the same types share compiled code: dynamo
keeps one cache per code object (a decoder layer's ``forward``), guarded on the types of the modules it calls, on
whether its input requires grad, on grad mode and on shapes. A 42-layer Gemma-2 therefore compiles a few graphs, not
42: one per kind of layer (frozen or adapted, nf4 or dequantized weights, recomputed or not, the first adapted layer -
its input needs no grad - apart), per grad mode (training, evaluation), per shape regime (the first length static, a
dynamic-length graph from the second length on). :mod:`trainer_core.fastpath.recompiles` counts what a fold compiled
again; tests/trainer_core/fastpath/test_recompiles.py holds the count a fold may reach.
"""

from __future__ import annotations

import copyreg
from collections.abc import Callable

import torch

from trainer_core.model.build import decoder_layers

# Versions dynamo keeps per code object before it runs the code eagerly. Its default (8) is below what the kinds of
# layer above need once multiplied by grad modes and shape regimes; a model whose count passed this would silently
# train eagerly, so it is generous, and the fold's metrics.json records the recompilations actually made.
RECOMPILE_LIMIT = 64

# Inductor options for dynamic-shape layers (model.compile=dynamic), under the user's model.compile_options. On an H100
# (torch 2.11, session 13) inductor's memory-coalescing analysis for tiling asserted on a symbolic size while compiling
# a Gemma-2 9B layer (InductorError in tiling_utils.get_pw_red_splits, before the fold's tenth step); with it off the
# same fold trained. torch's own config notes that the analysis does not yet apply to dynamic shapes.
DYNAMIC_OPTIONS = {"triton.coalesce_tiling_analysis": False}


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Dynamo's per-code-object version limit raised to at least ``limit``: a process-wide setting, only ever raised
    (idempotent; another caller's higher limit stays)."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)


def stable_cache_keys() -> None:
    """Every process keys a compiled graph alike, whatever it imported first: memory formats pickled by their name.

    Inductor's and AOT autograd's caches key a graph on its inputs' metadata, pickled with a copy of ``copyreg``'s
    reducers. A ``torch.memory_format`` has no ``__module__``, so pickle names it after the first module in
    ``sys.modules`` where ``torch.contiguous_format`` resolves (any module holding ``torch`` in its globals), which
    depends on what the process imported and when: on an H100 a fold in a Ray Train worker keyed every graph apart
    from the same graphs compiled in a plain process (its compile helpers', docs/PERFORMANCE.md session 20). A reducer
    here, as torch registers one for ``torch.layout``, names the format itself. Process-wide and idempotent; it
    changes cache keys only, never a compiled graph."""
    copyreg.pickle(torch.memory_format, _reduce_memory_format)


def _reduce_memory_format(fmt: torch.memory_format) -> tuple:
    return _memory_format, (str(fmt).removeprefix("torch."),)


def _memory_format(name: str) -> torch.memory_format:
    return getattr(torch, name)


def keep_nf4_layout_on_cpu(model) -> Callable[[], None]:
    """Stop bitsandbytes from repacking nf4 weights on the CPU; returns the undo.

    On a CPU with AVX512-BF16, bitsandbytes' ``Linear4bit.forward`` in eval mode without grad replaces the weight's
    data by a CPU-packed copy of another shape, inside the forward. A compiled layer traced through that call expected
    the packed shape and was handed the stored one: inductor's input check failed on the first held-out batch, after
    the whole fold had trained. With repacking off the layer dequantizes as in training (the same numbers). The switch
    is the module's own ``support_avx512bf16_for_cpu`` flag, set in its ``__init__``: bitsandbytes has no public one."""
    changed = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for m in changed:
        m.support_avx512bf16_for_cpu = False

    def undo() -> None:
        for m in changed:
            m.support_avx512bf16_for_cpu = True
    return undo


def compile_layers(model, dynamic: bool | None = None, options: dict | None = None, persistent_max: int = 0) -> int:
    """``torch.compile`` each decoder layer in place (parameter names and state dicts do not change); returns how many.
    ``dynamic``: torch.compile's (None: static first, dynamic from the second shape). ``options``: inductor's options,
    dotted names (``model.compile_options``). ``persistent_max``: rows of up to that many elements kept in registers
    (``model.persistent_reduction_max``, :mod:`trainer_core.fastpath.persistent_reduction`)."""
    from trainer_core.fastpath import persistent_reduction

    raise_recompile_limit()
    stable_cache_keys()
    persistent_reduction.install(persistent_max)
    options = {**(DYNAMIC_OPTIONS if dynamic is True else {}), **(options or {}),
               **persistent_reduction.compile_options(persistent_max)}
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=dynamic, options=options or None)
    return len(layers)
