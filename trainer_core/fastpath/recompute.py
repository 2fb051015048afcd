"""Recomputation (gradient checkpointing) of decoder layers, as the placement decides it
(:class:`trainer_core.fastpath.placement.Placement`: off, every layer, only some trained layers, or the seed's
reentrant way)."""

from __future__ import annotations

from trainer_core.model.build import decoder_layers


def enable_checkpointing(model, reentrant: bool = False, only: range | None = None) -> None:
    """Recompute each decoder layer's activations in backward (``only``: just the layers of that index range; the
    others keep their activations - partial recomputation for a card that almost fits).

    Non-reentrant (ours) needs no grad on the embeddings, so backward stops below the lowest trained layer. Reentrant
    (the seed, via peft's default) needs input grads, which carries the backward pass through every frozen layer."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": reentrant}
    enable = getattr(base, "activation_checkpointing_enable", None)  # transformers >= 5.2x; older: gradient_*
    if enable is not None:
        enable(kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if reentrant:
        base.enable_input_require_grads()
    else:
        base.disable_input_require_grads()
    if only is not None:
        for i, layer in enumerate(decoder_layers(model)):
            if i not in only:
                layer.gradient_checkpointing = False  # read per call by transformers' GradientCheckpointingLayer
