"""Every speed change applied after the plain build, in one ordered place.

The fold (``trainer_core.fold.loop``), prediction (``trainer_core.fold.inference``) and the step benchmark
(``orchestrator.perf.step_bench``) build a model with the same calls, so the benchmark times what a fold trains::

    fastpath.prepare_load(cfg.model)                   # attention names transformers must know before loading
    model = build_model(cfg.model, cfg.lora, ...)      # the plain model: quantized, LoRA, head (trainer_core.model)
    placement = fastpath.place(cfg, model, ...)        # what the device and the rows decide (placement.py)
    speed = fastpath.apply(model, cfg, placement)      # everything below, in this order
    ...
    speed.release()                                    # or fastpath.release(model): before the model goes

:func:`apply`'s order, and why each step stands where it does:

1. dequantized-weight cache (``model.dequant_cache``, nf4): first, while every frozen layer is still the
   ``Linear4bit`` peft left; its room is the free memory minus the placement's activations (a training step's, or
   for a model that predicts, an inference batch of the placement's ``micro_batch`` rows).
2. pooled last layer (``model.pooled_last_layer``): swaps the top layer's class; walks the cache's modules as they now
   are and must come before compiling (the layer compiles its pooled computation).
3. attention (``model.attn_implementation`` block_causal*): registered by :func:`prepare_load` before loading; here
   the built model is checked to be causal.
4. dropout sharing (``lora.shared_dropout``): after LoRA exists, before compiling; in a model that predicts too
   (evaluation mode makes it the identity, as the fold's own held-out rows had it, so their compiled graphs serve it).
5. fp8, after the cache: training (``model.fp8_backward``) on the cached layers of the trained decoder layers; a
   model that predicts (``model.fp8_predict``) has its nf4 weights cached in fp8 by step 1 and its other frozen
   linear layers (a bf16 base) made fp8 here.
6. compilation (``model.compile``): lazy (layers compile at their first call), after every module swap above, since a
   compiled layer's graph is guarded on its modules' types.
7. recomputation (the placement's): flags read by each layer at call time.

Global settings - the attention registries and the custom op (:func:`prepare_load`), dynamo's version limit and
inductor's choices handler (step 6) - are process-wide, made idempotently, and shared by every model of the process.
What belongs to one model - forward hooks (pooled positions, dropout draws) and class swaps - is undone by
:meth:`FastPath.release`: ``predict`` and ``tune`` build several models in one process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from trainer_core.config import BLOCK_CAUSAL, Config, ModelConfig, compile_options, pad_multiple
from trainer_core.fastpath.placement import Placement, place
from trainer_core.model.precision import DTYPES

log = logging.getLogger(__name__)

__all__ = ["FastPath", "Placement", "apply", "compiled", "place", "prepare_load", "release"]

_HANDLE = "trainer_core_fastpath"  # the model's attribute holding its FastPath (release(model) finds it there)


def prepare_load(model_cfg: ModelConfig) -> None:
    """Before ``build_model``: make ``model.attn_implementation`` block_causal/block_causal_triton known to
    transformers (its public attention and mask registries; the custom op of the fused softmax defined once).
    Idempotent; nothing for other attention implementations."""
    if model_cfg.attn_implementation in BLOCK_CAUSAL:
        from trainer_core.fastpath import attention

        attention.register()


@dataclass
class FastPath:
    """What :func:`apply` did to one model (``steps``: name -> note, in order) and how to undo what must not outlive
    it (:meth:`release`)."""

    placement: Placement
    steps: dict[str, str] = field(default_factory=dict)
    undo: list[Callable[[], None]] = field(default_factory=list, repr=False)
    released: bool = False

    @property
    def cache_note(self) -> str:
        """The dequantized-weight cache's note (and fp8's), empty when nothing was cached: for the benchmark table."""
        return "; ".join(self.steps[k] for k in ("dequant_cache", "fp8") if self.steps.get(k))

    def release(self) -> None:
        """Remove the model's forward hooks and put swapped classes back (pooled top layer, shared dropouts), last
        change first. The model then computes the plain model's numbers again (its dequantized copies of nf4 weights
        stay: the same numbers). Idempotent."""
        while self.undo:
            self.undo.pop()()
        self.released = True


def apply(model, cfg: Config, placement: Placement) -> FastPath:
    """Apply the fast path configured in ``cfg`` to ``model`` (built by ``build_model`` after :func:`prepare_load`),
    placed by ``placement`` (:func:`place`), in the order of this module's doc. Returns the handle whose
    :meth:`FastPath.release` undoes what belongs to this model; it is also kept on the model (:func:`release`)."""
    previous = getattr(model, _HANDLE, None)
    if previous is not None and not previous.released:
        raise RuntimeError("trainer_core.fastpath.apply: this model already has the fast path; release it first")
    m, lora = cfg.model, cfg.lora
    speed = FastPath(placement)
    from trainer_core.model.build import decoder_layer_count

    n_trained = decoder_layer_count(model) - lora.freeze_layers
    if m.quantization == "nf4" and placement.training:  # 1. dequantized-weight cache
        from trainer_core.fastpath.dequant_cache import cache_for_training

        speed.steps["dequant_cache"] = cache_for_training(
            model, m.dequant_cache, DTYPES[placement.precision], placement.device, freeze_layers=lora.freeze_layers,
            seq_len=placement.seq_len, micro_batch=placement.micro_batch, budget_gib=placement.budget_gib,
            recomputed=placement.recomputed(n_trained), fp8_backward=m.fp8_backward)
    elif m.quantization == "nf4":  # 1. the same cache beside a prediction batch of micro_batch rows
        from trainer_core.fastpath.dequant_cache import cache_for_prediction

        speed.steps["dequant_cache"] = cache_for_prediction(
            model, m.dequant_cache, DTYPES[placement.precision], placement.device, seq_len=placement.seq_len,
            rows=placement.micro_batch, budget_gib=placement.budget_gib, seqs_per_row=2 if m.head == "pairwise" else 1,
            fp8_forward=m.fp8_predict)
    if m.pooled_last_layer:  # 2. pooled last layer
        from trainer_core.fastpath.last_layer import pool_last_layer

        undo = pool_last_layer(model)
        if undo is not None:
            speed.undo.append(undo)
        speed.steps["pooled_last_layer"] = "top layer computes the pooled rows only"
    if m.attn_implementation in BLOCK_CAUSAL:  # 3. attention
        from trainer_core.fastpath import attention

        attention.check_causal(model)
        speed.steps["attention"] = m.attn_implementation
    if lora.enabled and lora.shared_dropout:  # 4. dropout sharing
        from trainer_core.fastpath.lora_dropout import share_dropout_draws

        parents, undo = share_dropout_draws(model)
        speed.undo.append(undo)
        speed.steps["shared_dropout"] = f"{parents} modules draw their siblings' dropout masks once"
    if m.fp8_backward and m.quantization == "nf4" and placement.training:  # 5. fp8
        from trainer_core.fastpath.dequant_cache import enable_fp8_backward

        speed.steps["fp8"] = enable_fp8_backward(model, lora.freeze_layers)
    elif m.fp8_predict and not placement.training:  # 5. fp8 (model.fp8_predict): the frozen layers left in bf16
        from trainer_core.fastpath.dequant_cache import predict_in_fp8

        speed.steps["fp8"] = predict_in_fp8(model)
    if m.compile != "off":  # 6. compilation
        from trainer_core.fastpath.compile import compile_layers, keep_nf4_layout_on_cpu

        if m.quantization == "nf4" and placement.device.type == "cpu":  # traced forwards must not repack weights
            speed.undo.append(keep_nf4_layout_on_cpu(model))

        # static shapes with length buckets (model.length_bucket): a few fixed lengths, each compiled once
        dynamic = True if m.compile == "dynamic" else (False if pad_multiple(m) else None)
        n = compile_layers(model, dynamic=dynamic, options=compile_options(m),
                           persistent_max=m.persistent_reduction_max)
        speed.steps["compile"] = f"{n} decoder layers compiled ({m.compile})"
    if placement.recompute != "off":  # 7. recomputation
        from trainer_core.fastpath.recompute import enable_checkpointing

        enable_checkpointing(model, reentrant=placement.recompute == "reentrant", only=placement.recompute_layers)
        speed.steps["recompute"] = placement.reason
    setattr(model, _HANDLE, speed)
    log.info("fast path: %s", "; ".join(f"{k}: {v}" for k, v in speed.steps.items()) or "nothing")
    return speed


def release(model) -> None:
    """Release the fast path :func:`apply` put on ``model`` (nothing if it has none): see :meth:`FastPath.release`."""
    speed = getattr(model, _HANDLE, None)
    if speed is not None:
        speed.release()


def compiled(model) -> bool:
    """Whether :func:`apply` compiled ``model``'s layers (and has not been released): its callers then keep batch
    shapes fixed (a new batch size compiles every kind of layer again)."""
    speed = getattr(model, _HANDLE, None)
    return speed is not None and not speed.released and "compile" in speed.steps
