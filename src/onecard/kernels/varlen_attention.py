"""Causal attention over packed variable-length sequences through PyTorch's FlashAttention-2 kernel (CUDA).

Why: a prefill step packs hundreds of prompts. One SDPA call per sequence per
layer costs a launch and a host round of Python each (the 1000-prompt offline
run spent a third of its time there); the varlen kernel does the whole batch
in one launch, without padding and without a mask tensor. Prefix attention
(prefix caching, chunked prefill) gathers each sequence's cached context into
one packed K/V in bounded groups and runs the same kernel with bottom-right
causal alignment (query i of a sequence with p cached tokens sees keys
0..p+i), so its memory no longer grows with a dense score matrix.

The ``models.llama`` loops stay the reference and the CPU / fp32 path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onecard.kernels.paged_attention import gather_kv

# Packed K+V gathered for one prefix-attention call is kept under this many bytes (the engine's fixed headroom
# covers it); a single sequence longer than that is gathered alone.
PREFIX_GATHER_BYTES = 256 << 20


def _flash_op():
    try:
        return torch.ops.aten._flash_attention_forward
    except (AttributeError, RuntimeError):  # pragma: no cover - very old torch
        return None


def flash_varlen_usable(q: torch.Tensor) -> bool:
    """FlashAttention needs CUDA (sm80+), fp16/bf16 and head_dim <= 256."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and q.shape[-1] % 8 == 0 and _flash_op() is not None
            and torch.cuda.get_device_capability(q.device)[0] >= 8)


def cumulative(lengths: list[int], device: torch.device) -> torch.Tensor:
    """``[0, l0, l0+l1, ...]`` as int32 on ``device`` (what the kernel indexes sequences by)."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32).to(device, non_blocking=True)


def varlen_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                  max_q: int, max_k: int, scale: float) -> torch.Tensor:
    """q ``[Tq, Hq, D]``, k/v ``[Tk, Hkv, D]`` (Hq a multiple of Hkv) -> ``[Tq, Hq, D]``, causal bottom-right."""
    return _flash_op()(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale)[0]


@dataclass
class PrefixGroup:
    """Sequences ``[first, last)`` of a prefill batch whose contexts are gathered together."""

    q_start: int
    q_end: int
    slots: torch.Tensor  # flat cache slots of every context token, sequence after sequence
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int


def prefix_groups(seq_lens: list[int], prefix_lens: list[int], block_tables: torch.Tensor, block_size: int,
                  token_budget: int) -> list[PrefixGroup]:
    """Split a prefill batch into groups whose gathered contexts stay under ``token_budget`` tokens.

    Built once per step (every layer reuses it): the slot indices come from the
    device block table with tensor ops, so the only host-to-device traffic is
    the few small length tensors.
    """
    dev = block_tables.device
    groups: list[PrefixGroup] = []
    b, q0 = 0, 0
    while b < len(seq_lens):
        e, ctx_sum = b, 0
        while e < len(seq_lens) and (e == b or ctx_sum + seq_lens[e] + prefix_lens[e] <= token_budget):
            ctx_sum += seq_lens[e] + prefix_lens[e]
            e += 1
        q_lens = seq_lens[b:e]
        ctx = [n + p for n, p in zip(q_lens, prefix_lens[b:e])]
        ctx_t = torch.tensor(ctx, dtype=torch.long).to(dev, non_blocking=True)
        cu_k = cumulative(ctx, dev)
        seq = torch.repeat_interleave(torch.arange(e - b, device=dev), ctx_t, output_size=ctx_sum)
        pos = torch.arange(ctx_sum, device=dev) - cu_k[:-1].long()[seq]
        slots = block_tables[b:e].long()[seq, pos // block_size] * block_size + pos % block_size
        groups.append(PrefixGroup(q0, q0 + sum(q_lens), slots, cumulative(q_lens, dev), cu_k, max(q_lens), max(ctx)))
        q0 += sum(q_lens)
        b = e
    return groups


def prefix_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, groups: list[PrefixGroup],
                     scale: float, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Each group's queries over its gathered paged context (the step's own keys were stored first)."""
    def flat(t: torch.Tensor | None) -> torch.Tensor | None:  # [blocks, block_size, ...] -> [slots, ...]
        return None if t is None else t.flatten(0, 1)

    outs = [varlen_causal(q[g.q_start:g.q_end], gather_kv(flat(k_cache), flat(k_scale), g.slots, q.dtype),
                          gather_kv(flat(v_cache), flat(v_scale), g.slots, q.dtype), g.cu_q, g.cu_k, g.max_q, g.max_k,
                          scale) for g in groups]
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)
