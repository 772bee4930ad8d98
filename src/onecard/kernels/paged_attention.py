"""Decode attention over a paged KV cache: Triton kernels and their PyTorch reference.

Cache layout (per layer): ``k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]``.
Sequence b's token at position p lives in block ``block_tables[b, p // block_size]``
at offset ``p % block_size``. ``context_lens[b]`` counts the cached tokens
(including the one being decoded, which ``store_kv`` wrote first).

Two Triton decode-attention kernels. ``paged_decode_attention_triton`` runs one program per (sequence, query
head) and walks the whole context serially: fine at short contexts, but at bs=1 and 32k tokens only B x Hq
programs stream gigabytes and each KV head is read GROUP times. ``paged_decode_attention_split`` (flash-decoding,
what the engine uses) runs one program per (sequence, KV head, context partition) computing all GROUP query heads
from one load of each K/V tile, then merges the partitions' (max, sum, acc) by log-sum-exp in a second small
kernel. Shapes of every tensor they read are fixed per batch size (the partition count comes from the block-table
width, not the lengths), and the context lengths are read on the device, so a CUDA graph can capture them.

Quantized caches (``kv_cache_dtype`` fp8 / int8, ``onecard.kernels.kv_quant``)
come with ``k_scale, v_scale: [num_blocks, block_size, num_kv_heads]``: every
writer here quantizes with them and every reader multiplies them back in
(the kernel in registers, after the loads).
"""

from __future__ import annotations

import torch

from onecard.kernels.kv_quant import MIN_SCALE, dequantize_kv, qmax_of, quantize_kv

try:  # Triton is optional: without it (or without CUDA and TRITON_INTERPRET) the reference path runs.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """Write keys/values of T tokens ``[T, Hkv, D]`` to their flat cache slots (no host sync); with scales, the
    cache is quantized (``quantize_kv``) and each token's per-head scales go to the same slots."""
    kc = k_cache.view(-1, *k_cache.shape[2:])
    vc = v_cache.view(-1, *v_cache.shape[2:])
    if k_scale is None:
        kc.index_copy_(0, slot_mapping, k.to(kc.dtype))
        vc.index_copy_(0, slot_mapping, v.to(vc.dtype))
        return
    for x, cache, scales in ((k, kc, k_scale), (v, vc, v_scale)):
        qx, sx = quantize_kv(x, cache.dtype)
        # 1-byte formats move as bytes: index_copy_ / indexing have no float8 kernels on every device
        cache.view(torch.uint8).index_copy_(0, slot_mapping, qx.view(torch.uint8))
        scales.view(-1, scales.shape[-1]).index_copy_(0, slot_mapping, sx)


def gather_kv(cache: torch.Tensor, scale: torch.Tensor | None, blocks: torch.Tensor,
              dtype: torch.dtype) -> torch.Tensor:
    """The listed blocks of a (possibly quantized) cache, ``[*blocks.shape, block_size, Hkv, D]`` in ``dtype``."""
    if scale is None:
        return cache[blocks].to(dtype)
    return dequantize_kv(cache.view(torch.uint8)[blocks].view(cache.dtype), scale[blocks], dtype)


def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                                     scale: float, k_scale: torch.Tensor | None = None,
                                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference (and the CPU path): gather each sequence's blocks, mask past its length, softmax.

    q: [B, Hq, D] -> [B, Hq, D]. Memory is B x max_blocks x block_size x Hkv x D,
    fine for CPU batch sizes; the Triton kernel never materializes it.
    """
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    blocks = block_tables.long()
    k = gather_kv(k_cache, k_scale, blocks, torch.float32).reshape(B, -1, Hkv, D)  # [B, S, Hkv, D]
    v = gather_kv(v_cache, v_scale, blocks, torch.float32).reshape(B, -1, Hkv, D)
    rep = Hq // Hkv
    qg = q.float().view(B, Hkv, rep, D)
    scores = torch.einsum("bgrd,bsgd->bgrs", qg, k) * scale
    pos = torch.arange(k.shape[1], device=q.device)
    scores = scores.masked_fill((pos[None, :] >= context_lens[:, None].long())[:, None, None, :], float("-inf"))
    out = torch.einsum("bgrs,bsgd->bgrd", scores.softmax(-1), v)
    return out.reshape(B, Hq, D).to(q.dtype)


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, out_ptr, block_tables_ptr, context_lens_ptr, scale,
                             stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_sb, stride_ss, stride_bt_b,
                             stride_ob, stride_oh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
                             QUANT: tl.constexpr):
        # TILE tokens (TILE // BLOCK_SIZE cache blocks, gathered) per iteration: more bytes in flight per program.
        # QUANT: fp8/int8 cache; each token's per-head scale multiplies its score (K) and its weight (V).
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
            if QUANT:
                soff = block * stride_sb + (pos % BLOCK_SIZE) * stride_ss + kv_head
                s = s * tl.load(ks_ptr + soff, mask=tmask, other=0.0).to(tl.float32)
            s = tl.where(tmask, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            v = tl.load(v_ptr + off, mask=mask2, other=0.0).to(tl.float32)
            pv = p
            if QUANT:
                pv = p * tl.load(vs_ptr + soff, mask=tmask, other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(pv[:, None] * v, axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        out = acc / l_i
        tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=dmask)


def rope_store_kv_reference(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                            head_dim: int, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate q and k (HF rotate-half convention, fp32 math), write k and v to their cache slots (quantized when
    scales are given), return q [T, H, D]."""
    T = qkv.shape[0]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    q = rot(q.reshape(T, num_heads, head_dim))
    store_kv(rot(k.reshape(T, num_kv_heads, head_dim)), v.reshape(T, num_kv_heads, head_dim), k_cache, v_cache,
             slot_mapping, k_scale, v_scale)
    return q


if triton is not None:

    @triton.jit
    def _quantize_store(x1, x2, cache, scale_ptr, offs, m, HALF: tl.constexpr, QMAX: tl.constexpr,
                        MIN_SCALE: tl.constexpr, IS_INT: tl.constexpr):
        # kv_quant.quantize_kv's arithmetic on one head (two halves of head_dim), IEEE division like torch's.
        amax = tl.maximum(tl.max(tl.where(m, tl.abs(x1), 0.0), axis=0), tl.max(tl.where(m, tl.abs(x2), 0.0), axis=0))
        sc = tl.maximum(tl.math.div_rn(amax, QMAX), MIN_SCALE).to(tl.float16)
        tl.store(scale_ptr, sc)
        sc = sc.to(tl.float32)
        q1 = tl.math.div_rn(x1, sc)
        q2 = tl.math.div_rn(x2, sc)
        if IS_INT:
            q1 = tl.floor(q1 + 0.5)
            q2 = tl.floor(q2 + 0.5)
        q1 = tl.minimum(tl.maximum(q1, -QMAX), QMAX)
        q2 = tl.minimum(tl.maximum(q2, -QMAX), QMAX)
        tl.store(cache + offs, q1.to(cache.dtype.element_ty), mask=m)
        tl.store(cache + HALF + offs, q2.to(cache.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_store_kernel(qkv_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, ks_ptr, vs_ptr, cos_sin_ptr, pos_ptr, slot_ptr,
                           stride_qkv, stride_qo, stride_cs, stride_slot, NUM_HEADS: tl.constexpr,
                           NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                           BLOCK_HALF: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
                           MIN_SCALE: tl.constexpr, IS_INT: tl.constexpr):
        # one program per (token, q-or-kv head): q heads are rotated into q_out, kv heads rotate k and copy v
        # straight into the paged cache. Replaces ~25 small kernels per layer at decode.
        # QUANT: k and v are quantized with a per-(token, head) scale written to ks/vs at [slot, head].
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
        elif QUANT:
            kh = h - NUM_HEADS
            slot = tl.load(slot_ptr + t).to(tl.int64)
            # k is quantized from its model-dtype rounding, as store_kv receives it on the PyTorch path
            o1 = o1.to(q_out_ptr.dtype.element_ty).to(tl.float32)
            o2 = o2.to(q_out_ptr.dtype.element_ty).to(tl.float32)
            _quantize_store(o1, o2, k_cache_ptr + slot * stride_slot + kh * HEAD_DIM, ks_ptr + slot * NUM_KV_HEADS + kh,
                            offs, m, HALF, QMAX, MIN_SCALE, IS_INT)
            vb = qkv_ptr + t.to(tl.int64) * stride_qkv + (NUM_HEADS + NUM_KV_HEADS + kh) * HEAD_DIM
            v1 = tl.load(vb + offs, mask=m, other=0.0).to(tl.float32)
            v2 = tl.load(vb + HALF + offs, mask=m, other=0.0).to(tl.float32)
            _quantize_store(v1, v2, v_cache_ptr + slot * stride_slot + kh * HEAD_DIM, vs_ptr + slot * NUM_KV_HEADS + kh,
                            offs, m, HALF, QMAX, MIN_SCALE, IS_INT)
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
                         head_dim: int, k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Fused RoPE + KV-cache write (Triton); same contract as ``rope_store_kv_reference``.

    fp8 stores need CUDA: the CPU interpreter's numpy fp8 cast is wrong where rounding carries into the exponent
    (127.6 is stored as 64), so off CUDA fp8 caches are written by ``rope_store_kv_reference``."""
    if k_cache.dtype == torch.float8_e4m3fn and not qkv.is_cuda:
        from onecard.errors import BadInputError

        raise BadInputError("the fused RoPE + fp8 KV store runs on CUDA only; off CUDA use rope_store_kv_reference "
                            "(the engine does unless fused_rope_store=True on a GPU)")
    T = qkv.shape[0]
    qkv = qkv.contiguous()
    q = torch.empty(T, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    half = head_dim // 2
    quant = k_scale is not None
    _rope_store_kernel[(T, num_heads + num_kv_heads)](
        qkv, q, k_cache, v_cache, k_scale if quant else k_cache, v_scale if quant else v_cache, cos_sin, positions,
        slot_mapping, qkv.stride(0), q.stride(0), cos_sin.stride(0), k_cache.stride(1),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half), QUANT=quant, QMAX=qmax_of(k_cache.dtype) if quant else 1.0,
        MIN_SCALE=MIN_SCALE, IS_INT=k_cache.dtype == torch.int8,
    )
    return q


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                  k_scale: torch.Tensor | None = None,
                                  v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Triton kernel: q [B, Hq, D] -> [B, Hq, D]; same contract as the reference."""
    if triton is None:
        from onecard.errors import MissingExtraError

        raise MissingExtraError("triton is not installed; install it with: pip install triton")
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    quant = k_scale is not None
    ks, vs = (k_scale, v_scale) if quant else (k_cache, v_cache)  # unread placeholders when not quantized
    _paged_decode_kernel[(B, Hq)](
        q, k_cache, v_cache, ks, vs, out, block_tables, context_lens, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        ks.stride(0), ks.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_SIZE=block_size,
        TILE=max(64, block_size), QUANT=quant,
    )
    return out


# ---- flash-decoding: split the context over programs ------------------------------------------------------------
# Programs a split launch aims for: several per SM on any card, so that a bs=1 long-context decode is not 32
# serial walks over the whole cache (the per-query-head kernel above) but hundreds of short ones. Partitions stay
# within [SPLIT_MIN_PARTITION, SPLIT_MAX_PARTITION] tokens: shorter ones pay more for their partials (GROUP / partition
# of the bytes read); longer ones leave a short context in a wide CUDA-graph table (max_model_len) on few programs.
# SPLIT_MAX_PROGRAMS overrides the upper bound: each program writes one partial, so it caps the workspace (2 KiB a
# program for Llama-3-8B heads) that a big captured batch would otherwise keep in the graph pool. A batch that fills
# the target with one program per (sequence, KV head) is not split at all.
# Untuned guesses: benchmarks/kernel_paged_decode.py times a range of partitions to set them from.
SPLIT_TARGET_PROGRAMS = 1024
SPLIT_MAX_PROGRAMS = 4 * SPLIT_TARGET_PROGRAMS
SPLIT_MIN_PARTITION = 128
SPLIT_MAX_PARTITION = 512
SPLIT_TILE = 64  # tokens per inner iteration (at least one cache block)
DOT_ROWS = 16  # tl.dot needs >= 16 rows: the GROUP query heads of a KV head are padded to this


def split_plan(batch: int, num_kv_heads: int, max_context: int, tile: int) -> tuple[int, int]:
    """(tokens per partition, partitions) for a launch of ``batch x num_kv_heads x partitions`` programs.

    Depends only on shapes (``max_context`` is the block-table width in tokens), never on the context lengths,
    so a CUDA graph captured once replays for any lengths: partitions past a sequence's end simply exit.
    Partitions are whole tiles, as many as fill ``SPLIT_TARGET_PROGRAMS`` within the bounds above."""
    tiles = max(1, -(-max_context // tile))
    lanes = max(1, batch * num_kv_heads)
    if lanes >= SPLIT_TARGET_PROGRAMS:
        return tiles * tile, 1
    per = max(-(-tiles * lanes // SPLIT_TARGET_PROGRAMS), -(-SPLIT_MIN_PARTITION // tile))
    per = min(per, max(1, SPLIT_MAX_PARTITION // tile))
    per = min(max(per, -(-tiles * lanes // SPLIT_MAX_PROGRAMS)), tiles)
    partition = per * tile
    return partition, -(-max_context // partition)


if triton is not None:

    @triton.jit
    def _paged_split_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, out_ptr, m_ptr, l_ptr, acc_ptr, block_tables_ptr,
                            context_lens_ptr, scale, partition, stride_qb, stride_qh, stride_kb, stride_ks, stride_kh,
                            stride_sb, stride_ss, stride_bt_b, stride_ob, stride_oh, SINGLE: tl.constexpr,
                            GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
                            QUANT: tl.constexpr, LOW_DOT: tl.constexpr):
        # One program per (sequence, KV head, partition): each K/V tile is loaded once for all GROUP query heads
        # (scores GROUP x TILE by tl.dot, rows padded to BLOCK_G >= 16). SINGLE (one partition) normalizes and
        # writes the output; otherwise the partial (max, sum, unnormalized acc) goes to the workspace for
        # _paged_combine_kernel.
        # QUANT: fp8/int8 cache; each token's per-head scale multiplies its score column (K) and weight (V).
        # LOW_DOT: both dots in the query's 16-bit dtype (fp32 accumulate); otherwise exact fp32 dots.
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
        lo = split * partition
        if lo < ctx:
            hi = tl.minimum(lo + partition, ctx)
            offs_g = tl.arange(0, BLOCK_G)
            offs_d = tl.arange(0, BLOCK_D)
            offs_t = tl.arange(0, TILE)
            gmask = offs_g < GROUP
            dmask = offs_d < HEAD_DIM
            heads = kv_head * GROUP + offs_g
            qmask = gmask[:, None] & dmask[None, :]
            q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=qmask, other=0.0)
            dt = q.dtype if LOW_DOT else tl.float32
            q = q.to(dt)
            m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_G], tl.float32)
            acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
            for start in range(lo, hi, TILE):
                pos = start + offs_t
                tmask = pos < hi
                block = tl.load(block_tables_ptr + seq * stride_bt_b + pos // BLOCK_SIZE, mask=tmask,
                                other=0).to(tl.int64)
                off = block[:, None] * stride_kb + (pos % BLOCK_SIZE)[:, None] * stride_ks + kv_head * stride_kh \
                    + offs_d[None, :]
                mask2 = tmask[:, None] & dmask[None, :]
                k = tl.load(k_ptr + off, mask=mask2, other=0.0).to(tl.float32).to(dt)
                if LOW_DOT:
                    s = tl.dot(q, tl.trans(k))
                else:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                s = s * scale
                if QUANT:
                    soff = block * stride_sb + (pos % BLOCK_SIZE) * stride_ss + kv_head
                    s = s * tl.load(ks_ptr + soff, mask=tmask, other=0.0).to(tl.float32)[None, :]
                s = tl.where(tmask[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                if QUANT:
                    p = p * tl.load(vs_ptr + soff, mask=tmask, other=0.0).to(tl.float32)[None, :]
                v = tl.load(v_ptr + off, mask=mask2, other=0.0).to(tl.float32).to(dt)
                if LOW_DOT:
                    pv = tl.dot(p.to(dt), v)
                else:
                    pv = tl.dot(p, v, input_precision="ieee")
                acc = acc * alpha[:, None] + pv
                m_i = m_new
            if SINGLE:
                out = acc / l_i[:, None]
                tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                         out.to(out_ptr.dtype.element_ty), mask=qmask)
            else:
                row = (seq * GROUP * tl.num_programs(1) + heads) * tl.num_programs(2) + split  # [B, Hq, splits]
                tl.store(m_ptr + row, m_i, mask=gmask)
                tl.store(l_ptr + row, l_i, mask=gmask)
                tl.store(acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=qmask)

    @triton.jit
    def _paged_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, context_lens_ptr, partition, splits, stride_ob,
                              stride_oh, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per (sequence, query head): log-sum-exp merge, CHUNK partials at a time, of the partitions
        # the sequence reached; the ones past its end were never written, so they are not read. The partition
        # count is a runtime value: eager steps (block tables as wide as the batch's longest) compile once.
        seq = tl.program_id(0)
        head = tl.program_id(1)
        ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
        n = tl.minimum(tl.cdiv(ctx, partition), splits)
        row = (seq * tl.num_programs(1) + head) * splits
        offs_c = tl.arange(0, CHUNK)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        m_run = tl.full([1], float("-inf"), tl.float32)
        total = tl.zeros([1], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for c in range(0, n, CHUNK):
            s = c + offs_c
            smask = s < n
            m = tl.load(m_ptr + row + s, mask=smask, other=float("-inf"))
            m_new = tl.maximum(m_run, tl.max(m, axis=0))
            alpha = tl.exp(m_run - m_new)
            w = tl.where(smask, tl.exp(m - m_new), 0.0)
            total = total * alpha + tl.sum(w * tl.load(l_ptr + row + s, mask=smask, other=0.0), axis=0)
            a = tl.load(acc_ptr + (row + s)[:, None] * HEAD_DIM + offs_d[None, :], mask=smask[:, None] & dmask[None, :],
                        other=0.0)
            acc = acc * alpha + tl.sum(w[:, None] * a, axis=0)
            m_run = m_new
        tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_d, (acc / total).to(out_ptr.dtype.element_ty),
                 mask=dmask)


def paged_decode_attention_split(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                                 partition: int | None = None, plan_rows: int | None = None) -> torch.Tensor:
    """Flash-decoding over the paged cache (Triton): same contract as ``paged_decode_attention_reference``.

    The grid is (B, Hkv, partitions) with partitions from ``split_plan`` over the block-table width, so it is
    fixed for a captured CUDA graph (the engine's static block table is max_model_len wide). ``partition``
    (tokens, a multiple of ``SPLIT_TILE``) overrides the plan, for tests and benchmarks; ``plan_rows`` plans it as
    for that many rows instead of ``B`` (a row's sums then run in the same order as in a ``plan_rows``-row launch,
    whatever else is in the batch). bf16/fp16 dots run on CUDA
    only: the CPU interpreter's bf16 ``tl.dot`` returns garbage, so there the dots are fp32."""
    if triton is None:
        from onecard.errors import MissingExtraError

        raise MissingExtraError("triton is not installed; install it with: pip install triton")
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    tile = max(SPLIT_TILE, block_size)
    max_context = block_tables.shape[1] * block_size
    if partition is None:
        partition, splits = split_plan(plan_rows or B, Hkv, max_context, tile)
    else:
        if partition % tile:
            from onecard.errors import BadInputError

            raise BadInputError(f"partition={partition} must be a multiple of the {tile}-token tile; pass a multiple")
        splits = max(1, -(-max_context // partition))
    q = q.contiguous()
    out = torch.empty_like(q)
    quant = k_scale is not None
    ks, vs = (k_scale, v_scale) if quant else (k_cache, v_cache)  # unread placeholders when not quantized
    group = Hq // Hkv
    work = (B * Hq * splits) if splits > 1 else 1
    m = torch.empty(work, dtype=torch.float32, device=q.device)
    lsum = torch.empty(work, dtype=torch.float32, device=q.device)
    acc = torch.empty(work * (D if splits > 1 else 1), dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(D)
    _paged_split_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, ks, vs, out, m, lsum, acc, block_tables, context_lens, scale, partition,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        ks.stride(0), ks.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        SINGLE=splits == 1, GROUP=group, BLOCK_G=max(DOT_ROWS, triton.next_power_of_2(group)), HEAD_DIM=D,
        BLOCK_D=block_d, BLOCK_SIZE=block_size, TILE=tile, QUANT=quant,
        LOW_DOT=q.is_cuda and q.dtype in (torch.bfloat16, torch.float16),
    )
    if splits > 1:
        _paged_combine_kernel[(B, Hq)](
            m, lsum, acc, out, context_lens, partition, splits, out.stride(0), out.stride(1),
            CHUNK=16, HEAD_DIM=D, BLOCK_D=block_d,
        )
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, use_triton: bool,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                           plan_rows: int | None = None) -> torch.Tensor:
    """Decode attention for the engine: the flash-decoding Triton kernel, or the PyTorch reference."""
    if use_triton:
        return paged_decode_attention_split(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale,
                                            plan_rows=plan_rows)
    return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale)
