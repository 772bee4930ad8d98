"""Decode attention over a paged KV cache: a Triton kernel and its PyTorch reference.

Cache layout (per layer): ``k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]``.
Sequence b's token at position p lives in block ``block_tables[b, p // block_size]``
at offset ``p % block_size``. ``context_lens[b]`` counts the cached tokens
(including the one being decoded, which ``store_kv`` wrote first).

The kernel runs one program per (sequence, query head), streams the sequence's
blocks (several per iteration) once and keeps an online softmax in registers (flash-decoding without
the split: at decode, the weights dominate the bytes moved, not the cache).
Shapes of every tensor it reads are fixed per batch size, and the context
lengths are read on the device, so a CUDA graph can capture it.
"""

from __future__ import annotations

import torch

try:  # Triton is optional: without it (or without CUDA and TRITON_INTERPRET) the reference path runs.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write keys/values of T tokens ``[T, Hkv, D]`` to their flat cache slots (no host sync)."""
    kc = k_cache.view(-1, *k_cache.shape[2:])
    vc = v_cache.view(-1, *v_cache.shape[2:])
    kc.index_copy_(0, slot_mapping, k.to(kc.dtype))
    vc.index_copy_(0, slot_mapping, v.to(vc.dtype))


def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                                     scale: float) -> torch.Tensor:
    """PyTorch reference (and the CPU path): gather each sequence's blocks, mask past its length, softmax.

    q: [B, Hq, D] -> [B, Hq, D]. Memory is B x max_blocks x block_size x Hkv x D,
    fine for CPU batch sizes; the Triton kernel never materializes it.
    """
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    k = k_cache[block_tables.long()].reshape(B, -1, Hkv, D).float()  # [B, S, Hkv, D]
    v = v_cache[block_tables.long()].reshape(B, -1, Hkv, D).float()
    rep = Hq // Hkv
    qg = q.float().view(B, Hkv, rep, D)
    scores = torch.einsum("bgrd,bsgd->bgrs", qg, k) * scale
    pos = torch.arange(k.shape[1], device=q.device)
    scores = scores.masked_fill((pos[None, :] >= context_lens[:, None].long())[:, None, None, :], float("-inf"))
    out = torch.einsum("bgrs,bsgd->bgrd", scores.softmax(-1), v)
    return out.reshape(B, Hq, D).to(q.dtype)


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, block_tables_ptr, context_lens_ptr, scale,
                             stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt_b, stride_ob,
                             stride_oh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr):
        # TILE tokens (TILE // BLOCK_SIZE cache blocks, gathered) per iteration: more bytes in flight per program.
        seq = tl.program_id(0)
        head = tl.program_id(1)
        kv_head = head // GROUP
        offs_d = tl.arange(0, BLOCK_D)
        offs_t = tl.arange(0, TILE)
        dmask = offs_d < HEAD_DIM
        q = tl.load(q_ptr + seq * stride_qb + head * stride_qh + offs_d, mask=dmask, other=0.0).to(tl.float32)
        ctx = tl.load(context_lens_ptr + seq)
        m_i = tl.full([1], float("-inf"), tl.float32)
        l_i = tl.zeros([1], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for start in range(0, ctx, TILE):
            pos = start + offs_t
            tmask = pos < ctx
            block = tl.load(block_tables_ptr + seq * stride_bt_b + pos // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
            off = block[:, None] * stride_kb + (pos % BLOCK_SIZE)[:, None] * stride_ks + kv_head * stride_kh \
                + offs_d[None, :]
            mask2 = tmask[:, None] & dmask[None, :]
            k = tl.load(k_ptr + off, mask=mask2, other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1) * scale
            s = tl.where(tmask, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            v = tl.load(v_ptr + off, mask=mask2, other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        out = acc / l_i
        tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=dmask)


def rope_store_kv_reference(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                            head_dim: int) -> torch.Tensor:
    """Rotate q and k (HF rotate-half convention, fp32 math), write k and v to their cache slots, return q [T, H, D]."""
    T = qkv.shape[0]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    q = rot(q.reshape(T, num_heads, head_dim))
    store_kv(rot(k.reshape(T, num_kv_heads, head_dim)), v.reshape(T, num_kv_heads, head_dim), k_cache, v_cache,
             slot_mapping)
    return q


if triton is not None:

    @triton.jit
    def _rope_store_kernel(qkv_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, cos_sin_ptr, pos_ptr, slot_ptr,
                           stride_qkv, stride_qo, stride_cs, stride_slot, NUM_HEADS: tl.constexpr,
                           NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                           BLOCK_HALF: tl.constexpr):
        # one program per (token, q-or-kv head): q heads are rotated into q_out, kv heads rotate k and copy v
        # straight into the paged cache. Replaces ~25 small kernels per layer at decode.
        t = tl.program_id(0)
        h = tl.program_id(1)
        offs = tl.arange(0, BLOCK_HALF)
        m = offs < HALF
        pos = tl.load(pos_ptr + t).to(tl.int64)
        cos = tl.load(cos_sin_ptr + pos * stride_cs + offs, mask=m, other=0.0)
        sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs, mask=m, other=0.0)
        base = qkv_ptr + t.to(tl.int64) * stride_qkv + h * HEAD_DIM
        x1 = tl.load(base + offs, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF + offs, mask=m, other=0.0).to(tl.float32)
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        if h < NUM_HEADS:
            out = q_out_ptr + t.to(tl.int64) * stride_qo + h * HEAD_DIM
            tl.store(out + offs, o1.to(q_out_ptr.dtype.element_ty), mask=m)
            tl.store(out + HALF + offs, o2.to(q_out_ptr.dtype.element_ty), mask=m)
        else:
            kh = h - NUM_HEADS
            slot = tl.load(slot_ptr + t).to(tl.int64)
            kc = k_cache_ptr + slot * stride_slot + kh * HEAD_DIM
            tl.store(kc + offs, o1.to(k_cache_ptr.dtype.element_ty), mask=m)
            tl.store(kc + HALF + offs, o2.to(k_cache_ptr.dtype.element_ty), mask=m)
            vb = qkv_ptr + t.to(tl.int64) * stride_qkv + (NUM_HEADS + NUM_KV_HEADS + kh) * HEAD_DIM
            vc = v_cache_ptr + slot * stride_slot + kh * HEAD_DIM
            tl.store(vc + offs, tl.load(vb + offs, mask=m, other=0.0).to(v_cache_ptr.dtype.element_ty), mask=m)
            tl.store(vc + HALF + offs, tl.load(vb + HALF + offs, mask=m, other=0.0).to(v_cache_ptr.dtype.element_ty),
                     mask=m)


def rope_store_kv_triton(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                         head_dim: int) -> torch.Tensor:
    """Fused RoPE + KV-cache write (Triton); same contract as ``rope_store_kv_reference``."""
    T = qkv.shape[0]
    qkv = qkv.contiguous()
    q = torch.empty(T, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    half = head_dim // 2
    _rope_store_kernel[(T, num_heads + num_kv_heads)](
        qkv, q, k_cache, v_cache, cos_sin, positions, slot_mapping,
        qkv.stride(0), q.stride(0), cos_sin.stride(0), k_cache.stride(1),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half),
    )
    return q


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Triton kernel: q [B, Hq, D] -> [B, Hq, D]; same contract as the reference."""
    if triton is None:
        from onecard.errors import MissingExtraError

        raise MissingExtraError("triton is not installed; install it with: pip install triton")
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    _paged_decode_kernel[(B, Hq)](
        q, k_cache, v_cache, out, block_tables, context_lens, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_SIZE=block_size,
        TILE=max(64, block_size),
    )
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, use_triton: bool) -> torch.Tensor:
    if use_triton:
        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale)
    return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale)
