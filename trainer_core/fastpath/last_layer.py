"""``model.pooled_last_layer``: the top decoder layer computes only the token the classifier reads.

The sequence-classification head scores one position per row, the last non-pad token (transformers' rule:
``(arange(T) * (input_ids != pad_token_id)).argmax(-1)``; position T - 1 without a pad id or without input ids). Every
other position of the top layer's output is never read, yet the layer computes queries, attention, o_proj, four
RMSNorms and the MLP for all T positions, forward and backward. Only its keys and values are needed everywhere. With
this on, the top layer normalises all positions and computes K and V for them, and everything else for the pooled row
alone: ~93% of that layer's work saved, ~2.7% of a Gemma-2 9B training step (measured: 1.02x the step on an H200).
The logits, loss and gradients are the same numbers up to float rounding
(tests/trainer_core/fastpath/test_last_layer.py).

The layer's output holds the computed rows at the pooled positions; every other position holds the layer's input
unchanged (anything would do: nothing reads it). So ``output_hidden_states`` is not the plain model's for the top
layer, and the key only serves the joint head (``model.head=joint``) of a Gemma-2 with eager attention's mask
(``attn_implementation`` eager, block_causal or block_causal_triton).

The layer object stays where it is and keeps its parameters' names (checkpoints and adapters load either way): only its
class becomes a subclass whose ``forward`` is the pooled one. It calls the layer's own submodules at call time, so LoRA
(and its dropout), nf4 layers and those ``trainer_core.fastpath.dequant_cache`` swaps in all keep working. The pooled
positions come from a forward pre-hook on the classifier, which stores them on the layer for its next call (and for
the recomputation of that call in the backward pass, which runs before the next forward). ``layer.compile()`` (see
``trainer_core.fastpath.compile.compile_layers``) compiles the pooled computation, with the positions as a tensor
argument: one graph for all batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding with transformers' own ``rotate_half`` (cos/sin broadcast over the head axis)."""
    from transformers.models.gemma2.modeling_gemma2 import rotate_half

    return x * cos + rotate_half(x) * sin


def pooled_layer_forward(layer, hidden_states: torch.Tensor, index: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A Gemma-2 decoder layer whose output is exact at ``index`` (B,) of each row, the input elsewhere.

    hidden_states (B, T, H); cos, sin (1 or B, T, head_dim); mask (B, 1, T, T) additive, as eager attention gets it."""
    attn = layer.self_attn
    batch, length, _ = hidden_states.shape
    rows = torch.arange(batch, device=hidden_states.device)
    normed = layer.input_layernorm(hidden_states)
    kv_shape = (batch, length, -1, attn.head_dim)
    keys = attn.k_proj(normed).view(kv_shape).transpose(1, 2)  # (B, kv heads, T, d)
    values = attn.v_proj(normed).view(kv_shape).transpose(1, 2)
    keys = _rope(keys, cos.unsqueeze(1), sin.unsqueeze(1))
    heads_kv = keys.shape[1]
    query = attn.q_proj(normed[rows, index]).view(batch, heads_kv, attn.num_key_value_groups, attn.head_dim)
    cos_q = cos.expand(batch, -1, -1)[rows, index][:, None, None]  # (B, 1, 1, d)
    sin_q = sin.expand(batch, -1, -1)[rows, index][:, None, None]
    query = _rope(query, cos_q, sin_q)  # (B, kv heads, groups, d): GQA without repeating K and V

    scores = torch.matmul(query, keys.transpose(2, 3)) * attn.scaling  # (B, kv heads, groups, T)
    if attn.attn_logit_softcapping is not None:
        scores = torch.tanh(scores / attn.attn_logit_softcapping) * attn.attn_logit_softcapping
    scores = scores + mask[rows, :, index][:, :, None]  # the pooled query's row of the real mask: (B, 1, 1, T)
    weights = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    p = attn.attention_dropout if attn.training else 0.0
    weights = torch.nn.functional.dropout(weights, p=p, training=attn.training)
    attended = torch.matmul(weights, values).reshape(batch, -1)  # (B, heads * d), heads in transformers' order

    residual = hidden_states[rows, index]
    out = residual + layer.post_attention_layernorm(attn.o_proj(attended))
    out = out + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(out)))
    return hidden_states.to(out.dtype).index_put((rows, index), out)


class PooledLastLayer:
    """Mixed in front of the top decoder layer's class by :func:`pool_last_layer`."""

    pooled_index: torch.Tensor | None = None  # (B,) set by the classifier's pre-hook before each call
    pooled_fn = staticmethod(pooled_layer_forward)  # replaced by its torch.compile'd version by compile()

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | dict | None = None, position_ids: torch.Tensor | None = None,
                cache=None, **kwargs) -> torch.Tensor:
        if isinstance(attention_mask, dict):
            attention_mask = attention_mask[self.self_attn.layer_type]
        if cache is not None or position_embeddings is None:
            raise RuntimeError("model.pooled_last_layer: needs position embeddings and no KV cache (use_cache=False)")
        if not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4
                and attention_mask.is_floating_point()):
            raise RuntimeError("model.pooled_last_layer: needs the 4-D additive mask of attn_implementation=eager or "
                               "block_causal, got "
                               f"{type(attention_mask).__name__}")
        batch, length = hidden_states.shape[:2]
        index = self.pooled_index
        if index is None:  # no input ids (inputs_embeds): transformers pools the last position
            index = torch.full((batch,), length - 1, dtype=torch.long, device=hidden_states.device)
        elif index.shape[0] != batch:
            raise RuntimeError(f"model.pooled_last_layer: {index.shape[0]} pooled positions for {batch} rows (the "
                               "layer was called without its classifier)")
        cos, sin = position_embeddings
        return self.pooled_fn(self, hidden_states, index, cos, sin, attention_mask)

    def compile(self, *args, **kwargs) -> None:
        """Compile the pooled computation (not ``__call__``, which reads the positions off this module)."""
        self.pooled_fn = torch.compile(pooled_layer_forward, *args, **kwargs)


def pooled_positions(input_ids: torch.Tensor | None, pad_token_id: int | None) -> torch.Tensor | None:
    """The position each row is pooled at, by transformers' rule; None = the last position of every row."""
    if input_ids is None or pad_token_id is None:
        return None
    non_pad = (input_ids != pad_token_id).to(torch.int32)
    return (torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32) * non_pad).argmax(-1)


@functools.cache
def _pooled_class(cls: type) -> type:
    """One subclass per layer class (torch.compile guards on a module's type: models built in one process share it)."""
    return type(f"Pooled{cls.__name__}", (PooledLastLayer, cls), {"__module__": __name__})


def pool_last_layer(model) -> Callable[[], None] | None:
    """Make the top decoder layer of ``model`` (a Gemma-2 sequence classifier, possibly peft-wrapped) compute only
    the pooled rows. Call before compiling. Returns the function that undoes it (the classifier's pre-hook removed,
    the layer's own class back), or None if the layer already computes only the pooled rows."""
    from trainer_core.model.build import decoder_layers

    classifier = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(classifier.config, "model_type", None) != "gemma2" or not hasattr(classifier, "score"):
        raise ValueError(f"model.pooled_last_layer supports Gemma-2 sequence classifiers only, not "
                         f"{type(classifier).__name__}")
    top = decoder_layers(model)[-1]
    if isinstance(top, PooledLastLayer):
        return None
    plain_class = type(top)
    top.__class__ = _pooled_class(plain_class)

    def store_positions(module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        top.pooled_index = pooled_positions(input_ids, module.config.get_text_config().pad_token_id)

    hook = classifier.register_forward_pre_hook(store_positions, with_kwargs=True)

    def undo() -> None:
        hook.remove()
        top.__class__ = plain_class
        for name in ("pooled_index", "pooled_fn"):  # instance values set by the hook and by compile()
            top.__dict__.pop(name, None)

    return undo
