"""``model.attn_implementation: block_causal``: eager attention that skips the key blocks causality masks anyway.

Gemma-2 soft-caps its attention logits (``softcap * tanh(scores / softcap)``), which the fused kernels that can run
here (PyTorch's SDPA) do not do; flex_attention does, but was slower than compiled eager attention on an H200
(docs/PERFORMANCE.md). Eager attention computes every (query, key) score of a causal model, then masks the upper half.
This computes the same scores block by block: queries ``s:e`` meet keys ``0:e`` only, the keys causality allows (the
skipped ones get exactly zero weight: their mask is the dtype's minimum, whose exponential underflows to 0). With
blocks of ``BLOCK`` queries a 1,024-token row computes 62.5% of the scores, softmax and value products.

Grouped-query attention without repeating keys and values: the query heads that share a key/value head are stacked
along the query axis, so one matmul serves the group (transformers' eager path copies K and V per query head first).

Each operation is eager's, in eager's order and dtypes (scale, soft-cap, mask, fp32 softmax, dropout); only the sum
order inside the softmax differs. The mask is transformers' 4-D additive eager mask (padding, causality, sliding
window; :func:`additive_mask`), sliced per block, so the function only assumes a causal model: queries never attend
to later positions.

``block_causal_triton`` is the same function with the scale, soft-cap, mask and softmax of each block as one custom op
(:mod:`trainer_core.fastpath.softcap_softmax`: a Triton kernel each way on CUDA, the same fp32 math in plain torch
elsewhere).
Measured on an H200 (docs/PERFORMANCE.md, session 5): 1.01x the step each. Once the mask no longer made each step
wait for the previous one (session 6), ``block_causal`` was 1.02x ``block_causal_triton``: the custom op's host time per
call (264 calls a step) outweighs the card time its kernels save.
"""

from __future__ import annotations

import torch

from trainer_core.config import BLOCK_CAUSAL
from trainer_core.fastpath.softcap_softmax import define_ops, softcap_softmax

NAME, TRITON_NAME = BLOCK_CAUSAL  # the second: the soft-capped softmax as one Triton kernel each way on CUDA
BLOCK = 256  # queries per block: 4 blocks for 1,024 tokens (62.5% of the scores); smaller blocks, smaller matmuls


def block_causal_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           softcap: float | None = None, fused: bool = False, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (B, H, T, d), key/value (B, H_kv, T, d), attention_mask
    (B, 1, T, T) additive. Returns ((B, T, H, d), None): attention weights are never materialised whole.
    ``fused``: the scale, soft-cap, mask and softmax as one op (:mod:`trainer_core.fastpath.softcap_softmax`)."""
    if attention_mask is None or attention_mask.dim() != 4 or query.shape[2] != key.shape[2]:
        raise RuntimeError("attn_implementation block_causal(_triton) needs the 4-D eager mask and no KV cache "
                           "(training and prediction of a causal classifier)")
    if not getattr(module, "is_causal", False):
        raise RuntimeError(f"attn_implementation block_causal(_triton) serves causal attention only; "
                           f"{type(module).__name__} is not")
    scaling = module.head_dim ** -0.5 if scaling is None else scaling
    batch, heads, length, dim = query.shape
    heads_kv = key.shape[1]
    groups = heads // heads_kv
    grouped = query.view(batch, heads_kv, groups, length, dim)
    p = dropout if module.training else 0.0
    blocks = []
    # Loop over the block count, not over range(0, length, BLOCK): under torch.compile with a dynamic length the
    # latter specializes on the exact length (a new graph per batch length, up to dynamo's limit of 64 versions),
    # while this guards only on the count - one graph per 256 tokens of length, 4 up to 1,024.
    for b in range((length + BLOCK - 1) // BLOCK):
        start = b * BLOCK
        end = min(start + BLOCK, length)  # a guard on the comparison, not on the length
        rows = end - start
        q = grouped[:, :, :, start:end].reshape(batch, heads_kv, groups * rows, dim)
        weights = torch.matmul(q, key[:, :, :end].transpose(2, 3))  # (B, H_kv, groups * rows, end)
        if fused:
            weights = softcap_softmax(weights.view(batch, heads, rows, end), attention_mask[:, :, start:end, :end],
                                      scaling, softcap)
        else:
            weights = weights * scaling
            if softcap is not None:
                weights = weights / softcap
                weights = torch.tanh(weights)
                weights = weights * softcap
            weights = weights.view(batch, heads_kv, groups, rows, end) + attention_mask[:, :, None, start:end, :end]
            weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
        weights = torch.nn.functional.dropout(weights, p=p, training=module.training)
        out = torch.matmul(weights.view(batch, heads_kv, groups * rows, end), value[:, :, :end])
        blocks.append(out.view(batch, heads_kv, groups, rows, dim))
    out = torch.cat(blocks, dim=3).view(batch, heads, length, dim)
    return out.transpose(1, 2).contiguous(), None


def block_causal_triton_attention(*args, **kwargs) -> tuple[torch.Tensor, None]:
    """:func:`block_causal_attention` with the fused soft-capped softmax (Triton on CUDA, the same numbers in plain
    torch elsewhere)."""
    return block_causal_attention(*args, **kwargs, fused=True)


def causal(batch_idx, head_idx, q_idx, kv_idx) -> torch.Tensor:
    """transformers' mask-function form (index tensors in, booleans out) of plain causality."""
    return kv_idx <= q_idx


def additive_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                  mask_function=causal, attention_mask: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                  use_vmap: bool = False, **kwargs) -> torch.Tensor:
    """transformers' eager mask (B, 1, Q, K): 0 where a query may attend, the dtype's minimum elsewhere. Registered in
    transformers' public mask registry (``AttentionMaskInterface``), which calls it with these keywords: the pattern
    (causal, sliding window) as ``mask_function`` over index tensors, the 2-D padding mask as ``attention_mask``.

    Built here, in a few lines of torch, on the padding mask's device, with no host sync and no data-dependent
    branch. transformers' own ``sdpa_mask`` (from 5.4) builds its index tensors on its ``device`` argument, "cpu"
    unless given, and indexes the padding mask with them: a caller that leaves ``device`` out (transformers' own
    ``create_causal_mask`` passes it; the GPU test's call did not) gets a blocking host-to-device copy of the indices
    (``called a synchronizing CUDA operation`` at masking_utils.py:178 of 5.17). Its signature also changed across
    5.x (``cache_position`` until 5.3, ``allow_torch_fix`` until 5.17). The zero is made on the device too:
    ``torch.tensor(0.0, device=...)``, as transformers 5.17's ``eager_mask`` has it, is a blocking copy that made every
    step wait for the previous one (1.01x the step, docs/PERFORMANCE.md)."""
    if use_vmap:  # transformers asks for vmap only for patterns that are not index arithmetic (multimodal masks)
        raise NotImplementedError("attn_implementation block_causal(_triton) builds index-based masks only; this "
                                  "model's mask needs vmap: use attn_implementation=eager")
    if attention_mask is not None:
        device = attention_mask.device if device is None else device
    device = torch.device("cpu" if device is None else device)
    q_idx = torch.arange(q_length, device=device) + q_offset
    kv_idx = torch.arange(kv_length, device=device) + kv_offset
    allowed = mask_function(torch.arange(batch_size, device=device)[:, None, None, None],
                            torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device),
                            q_idx[None, None, :, None], kv_idx[None, None, None, :])
    if attention_mask is not None:  # keys kv_offset.. of each row; past the 2-D mask's end: padding, as transformers
        padding = attention_mask.to(device=device, dtype=torch.bool)[:, kv_offset:kv_offset + kv_length]
        padding = torch.nn.functional.pad(padding, (0, kv_length - padding.shape[-1]))
        allowed = allowed & padding[:, None, None, :]
    allowed = allowed.expand(batch_size, 1, q_length, kv_length)
    return torch.where(allowed, torch.zeros((), device=device, dtype=dtype), torch.finfo(dtype).min)


def register() -> None:
    """Make ``attn_implementation`` block_causal and block_causal_triton known to transformers (its public attention
    and mask registries), with eager's additive mask (:func:`additive_mask`). Idempotent; called by ``build_model``
    before loading, never at import."""
    from transformers import AttentionInterface, AttentionMaskInterface

    define_ops()
    for name, function in ((NAME, block_causal_attention), (TRITON_NAME, block_causal_triton_attention)):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, additive_mask)


def check_causal(model) -> None:
    """Refuse a model with a non-causal attention layer (an encoder) once built, before any batch: skipping the keys
    after each query block would silently change its numbers."""
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Attention") and not getattr(module, "is_causal", False):
            raise ValueError(f"model.attn_implementation block_causal(_triton) serves causal decoders only; {name} "
                             f"({type(module).__name__}) attends both ways")
