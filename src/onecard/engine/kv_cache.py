"""The paged KV cache's storage: allocation in the model dtype or fp8/int8 (+ per-token-per-head scales), wiring it
into the model's attention layers, and teacher-forced logits read back through it (the quality cost of a format).

One tensor holds every layer's K and V (``[2, layers, blocks, block_size, kv_heads, head_dim]``) so the engine
allocates the cache in one piece; the scales, when the format has them, are one more tensor of the same shape
minus head_dim (``onecard.kernels.kv_quant`` says why per token and head).
"""

from __future__ import annotations

import torch

from onecard.kernels.kv_quant import SCALE_DTYPE, kv_storage
from onecard.models.config import ModelArgs
from onecard.models.llama import AttentionMetadata, LlamaModel


def allocate_kv_cache(args: ModelArgs, num_blocks: int, block_size: int, kv_cache_dtype: str,
                      model_dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cache, scales or None). Scales start at one, so slots nobody wrote (the CUDA-graph scratch block, padding
    rows) dequantize to zeros rather than to garbage."""
    cache_dtype, scaled = kv_storage(kv_cache_dtype, model_dtype)
    shape = (2, args.num_layers, num_blocks, block_size, args.num_kv_heads)
    cache = torch.zeros(*shape, args.head_dim, dtype=cache_dtype, device=device)
    scales = torch.ones(shape, dtype=SCALE_DTYPE, device=device) if scaled else None
    return cache, scales


def attach_kv_cache(model: LlamaModel, cache: torch.Tensor | None, scales: torch.Tensor | None) -> None:
    """Point every attention layer at its slice of the cache (``None`` detaches: the model runs cache-free)."""
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        attn.k_cache, attn.v_cache = (cache[0, i], cache[1, i]) if cache is not None else (None, None)
        attn.k_scale, attn.v_scale = (scales[0, i], scales[1, i]) if scales is not None else (None, None)


@torch.no_grad()
def logits_through_cache(model: LlamaModel, input_ids: torch.Tensor, kv_cache_dtype: str,
                         block_size: int = 16) -> torch.Tensor:
    """Full-sequence logits ``[T, vocab]`` of one sequence whose every attention reads its keys/values back from a
    fresh paged cache in ``kv_cache_dtype`` (the prefix-attention path), so perplexity measures what the format
    loses at every position. The model must not be attached to an engine's cache (it is detached afterwards)."""
    ids = input_ids.reshape(-1)
    T = ids.numel()
    device = ids.device
    num_blocks = -(-T // block_size)
    cache, scales = allocate_kv_cache(model.args, num_blocks, block_size, kv_cache_dtype,
                                      next(model.parameters()).dtype, device)
    attach_kv_cache(model, cache, scales)
    try:
        meta = AttentionMetadata(True, torch.arange(T, device=device), seq_lens=[T], prefix_lens=[0],
                                 block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None])
        return model.compute_logits(model(ids, torch.arange(T, device=device), meta))
    finally:
        attach_kv_cache(model, None, None)
