"""``lora.shared_dropout``: the LoRA dropout masks of sibling modules that read the same input, from one random draw.

peft gives every adapted module its own ``nn.Dropout`` on its input. q_proj, k_proj and v_proj of one attention layer
read the same tensor, so a step draws three uniform numbers per element of it, and compiled, each is one Philox call
(torch.compile's kernels keep one of the four 32-bit numbers a call yields). On Gemma-2 9B that was most of the 225 µs
the input norm of a trained layer took on an H200 against 36 µs for a frozen one (docs/PERFORMANCE.md, session 6).

With this on, a forward pre-hook on the parent module (the attention, or the MLP for gate_proj/up_proj) draws one
random 62-bit integer per element of its input; each sibling's dropout keeps an element when its own 20-bit field of
that integer is at least ``round(p * 2**20)``, and scales what it keeps by the inverse of the keep probability, as
``nn.Dropout`` does. The fields are disjoint bits of one uniform integer, so the masks are independent, each module
keeps an element with probability ``1 - p'``, ``p' = round(p * 2**20) / 2**20`` (0.05 -> 0.0500002), and the
expectation is unchanged: the same distribution as peft's dropout, one draw instead of three, not the same random
stream. A forward hook drops the draw when the parent returns.

Where the parent is not called with its input as the siblings see it (the pooled top layer of
``model.pooled_last_layer`` calls k_proj and v_proj itself), or the shapes differ, each module falls back to plain
dropout. Evaluation mode is the identity, as before. Non-reentrant recomputation (``model.gradient_checkpointing``)
restores the random state, so a recomputed layer draws the same masks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

FIELD_BITS = 20  # three fields in the 62 bits of one draw
FIELD = (1 << FIELD_BITS) - 1
SIBLINGS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


class Draw:
    """The random integers of one parent call, shared by its siblings' dropouts (None between calls)."""

    bits: torch.Tensor | None = None


def threshold(p: float) -> int:
    """A field keeps its element when it is at least this: ``round(p * 2**20)``, so ``p' = threshold / 2**20``."""
    return round(p * (FIELD + 1))


class SharedDropout(torch.nn.Module):
    """Inverted dropout whose keep/drop decision is field ``slot`` of the parent's draw (plain dropout without one)."""

    def __init__(self, p: float, slot: int, draw: Draw):
        super().__init__()
        if not 0.0 < p < 1.0:
            raise ValueError(f"lora.shared_dropout needs 0 < lora.dropout < 1, got {p}")
        self.p, self.slot, self.draw = p, slot, draw
        self.threshold = threshold(p)
        self.scale = 1.0 / (1.0 - self.threshold / (FIELD + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        bits = self.draw.bits
        if bits is None or bits.shape != x.shape or bits.device != x.device:
            return F.dropout(x, self.p, True)
        keep = ((bits >> (FIELD_BITS * self.slot)) & FIELD) >= self.threshold
        return x * keep * self.scale

    def extra_repr(self) -> str:
        return f"p={self.p}, slot={self.slot}, p_effective={self.threshold / (FIELD + 1):.7f}"


def _parent_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    x = kwargs.get("hidden_states", args[0] if args else None)
    return x if isinstance(x, torch.Tensor) else None


def _draw_hooks(parent: torch.nn.Module, draw: Draw) -> list:
    """The pre-hook that draws before ``parent`` runs and the hook that drops the draw after; returns their handles."""
    def before(module, args: tuple, kwargs: dict) -> None:
        x = _parent_input(args, kwargs)
        draw.bits = None if x is None or not module.training else torch.randint(
            0, 1 << (3 * FIELD_BITS + 2), x.shape, device=x.device, dtype=torch.int64)

    def after(module, args: tuple, kwargs: dict, output) -> None:
        draw.bits = None

    return [parent.register_forward_pre_hook(before, with_kwargs=True),
            parent.register_forward_hook(after, with_kwargs=True)]


def share_dropout_draws(model, adapter: str = "default") -> tuple[int, Callable[[], None]]:
    """Replace the LoRA dropouts of sibling modules (q/k/v of an attention, gate/up of an MLP) with
    :class:`SharedDropout` fed by one draw per parent call. Call after ``get_peft_model`` and before compiling; a
    no-op for modules with ``lora.dropout = 0`` (peft's ``Identity``). Returns how many parents now draw once, and the
    function that undoes it (hooks removed, peft's own dropouts back)."""
    count, hooks, replaced = 0, [], []
    for parent_name, parent in model.named_modules():
        names = SIBLINGS.get(parent_name.rsplit(".", 1)[-1])
        if names is None:
            continue
        dropouts = []
        for name in names:
            module_dict = getattr(getattr(parent, name, None), "lora_dropout", None)
            layer = module_dict[adapter] if module_dict is not None and adapter in module_dict else None
            if isinstance(layer, torch.nn.Dropout) and layer.p > 0:
                dropouts.append((module_dict, layer))
        rates = {layer.p for _, layer in dropouts}
        if len(dropouts) < 2 or len(rates) != 1 or not 0 < threshold(dropouts[0][1].p) <= FIELD:
            continue  # one adapted sibling gains nothing; different rates, or one finer than 2**-20, stay peft's
        draw = Draw()
        for slot, (module_dict, layer) in enumerate(dropouts):
            module_dict[adapter] = SharedDropout(layer.p, slot, draw)
            replaced.append((module_dict, layer))
        hooks += _draw_hooks(parent, draw)
        count += 1

    def undo() -> None:
        for hook in hooks:
            hook.remove()
        for module_dict, layer in replaced:
            module_dict[adapter] = layer

    return count, undo
