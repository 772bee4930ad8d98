"""Decode attention over a paged KV cache: Triton kernels and their PyTorch reference.

Cache layout (per layer): ``k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]``.
Sequence b's token at position p lives in block ``block_tables[b, p // block_size]``
at offset ``p % block_size``. ``context_lens[b]`` counts the cached tokens
(including the one being decoded, which ``store_kv`` wrote first).

Three Triton decode-attention paths. ``paged_decode_attention_triton`` runs one program per (sequence, query
head) and walks the whole context serially: fine at short contexts, but at bs=1 and 32k tokens only B x Hq
programs stream gigabytes and each KV head is read GROUP times. ``paged_decode_attention_split`` (flash-decoding)
runs one program per (sequence, KV head, context partition) computing all GROUP query heads from one load of each
K/V tile, then merges the partitions' (max, sum, acc) by log-sum-exp in a second small kernel.
``paged_decode_attention_fused`` (what the engine uses on CUDA) is the same flash-decoding with RoPE and the new
token's cache write in front and the merge at the end, in one launch (the last partition to finish merges).
Shapes of every tensor they read are fixed per batch size (the partition count comes from the block-table width,
not the lengths), and the context lengths are read on the device, so a CUDA graph can capture them.

Quantized caches (``kv_cache_dtype`` fp8 / int8, ``onecard.kernels.kv_quant``)
come with ``k_scale, v_scale: [num_blocks, block_size, num_kv_heads]``: every
writer here quantizes with them and every reader multiplies them back in
(the kernel in registers, after the loads).
"""

from __future__ import annotations

import torch

from onecard.kernels.counters import zeroed_counters
from onecard.kernels.kv_quant import MIN_SCALE, dequantize_kv, qmax_of, quantize_kv

try:  # Triton is optional: without it (or without CUDA and TRITON_INTERPRET) the reference path runs.
    import triton
    import triton.language as tl

    from onecard.kernels.launch import let_next_start, pdl_launch, wait_for_inputs
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
                            v_scale: torch.Tensor | None = None,
                            return_k: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (HF rotate-half convention, fp32 math), write k and v to their cache slots (quantized when
    scales are given), return q [T, H, D] (``return_k``: and the rotated k [T, Hkv, D], in qkv's dtype)."""
    T = qkv.shape[0]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    q, k = rot(q.reshape(T, num_heads, head_dim)), rot(k.reshape(T, num_kv_heads, head_dim))
    store_kv(k, v.reshape(T, num_kv_heads, head_dim), k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return (q, k) if return_k else q


if triton is not None:

    @triton.jit
    def _rope(base, offs_d, mask, cs_row, HALF: tl.constexpr):
        # HF's rotate-half RoPE of the head(s) at ``base`` (a pointer, or a [rows, 1] block of them) in fp32:
        # channel d pairs with d +- HALF, so a whole head is one load plus one permuted load of the same bytes.
        first = offs_d < HALF
        c = tl.where(first, offs_d, offs_d - HALF)
        cos = tl.load(cs_row + c, mask=offs_d < 2 * HALF, other=0.0)
        sin = tl.load(cs_row + HALF + c, mask=offs_d < 2 * HALF, other=0.0)
        x = tl.load(base + offs_d, mask=mask, other=0.0).to(tl.float32)
        xr = tl.load(base + tl.where(first, offs_d + HALF, offs_d - HALF), mask=mask, other=0.0).to(tl.float32)
        return tl.where(first, x * cos - xr * sin, x * cos + xr * sin)

    @triton.jit
    def _as_stored(x, dmask, cache_ty: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
                   MIN_SCALE: tl.constexpr, IS_INT: tl.constexpr):
        # one token's head (fp32 [BLOCK_D]) as the cache holds it: (codes in the cache dtype, fp16 scale); QUANT:
        # kv_quant.quantize_kv's arithmetic (one scale per token and head, IEEE division like torch's), else scale 1
        if QUANT:
            amax = tl.max(tl.where(dmask, tl.abs(x), 0.0), axis=0)
            sc = tl.maximum(tl.math.div_rn(amax, QMAX), MIN_SCALE).to(tl.float16)
            x = tl.math.div_rn(x, sc.to(tl.float32))
            if IS_INT:
                x = tl.floor(x + 0.5)
            x = tl.minimum(tl.maximum(x, -QMAX), QMAX)
        else:
            sc = tl.full([], 1.0, tl.float16)
        return x.to(cache_ty), sc

    @triton.jit
    def _store_new_kv(row, k_ptr, v_ptr, ks_ptr, vs_ptr, cs_row, slot, kh, stride_slot, offs_d, dmask,
                      NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                      QUANT: tl.constexpr, QMAX: tl.constexpr, MIN_SCALE: tl.constexpr, IS_INT: tl.constexpr):
        # KV head kh of the token whose fused q|k|v row is ``row``: k rotated, then rounded to the model dtype (as
        # store_kv receives it on the PyTorch path), v as is, both to cache slot ``slot``; returns them as stored
        # (codes, scale) for a kernel that attends to the new token from registers, and the rounded rotated k
        k = _rope(row + (NUM_HEADS + kh) * HEAD_DIM, offs_d, dmask, cs_row, HALF)
        k = k.to(row.dtype.element_ty).to(tl.float32)
        v = tl.load(row + (NUM_HEADS + NUM_KV_HEADS + kh) * HEAD_DIM + offs_d, mask=dmask, other=0.0).to(tl.float32)
        kq, ksc = _as_stored(k, dmask, k_ptr.dtype.element_ty, QUANT, QMAX, MIN_SCALE, IS_INT)
        vq, vsc = _as_stored(v, dmask, v_ptr.dtype.element_ty, QUANT, QMAX, MIN_SCALE, IS_INT)
        at = slot * stride_slot + kh * HEAD_DIM
        tl.store(k_ptr + at + offs_d, kq, mask=dmask)
        tl.store(v_ptr + at + offs_d, vq, mask=dmask)
        if QUANT:
            tl.store(ks_ptr + slot * NUM_KV_HEADS + kh, ksc)
            tl.store(vs_ptr + slot * NUM_KV_HEADS + kh, vsc)
        return kq, ksc, vq, vsc, k

    @triton.jit
    def _rope_store_kernel(qkv_ptr, q_out_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr, ks_ptr, vs_ptr, cos_sin_ptr,
                           pos_ptr, slot_ptr, stride_qkv, stride_qo, stride_ko, stride_cs, stride_slot,
                           NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                           HALF: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
                           MIN_SCALE: tl.constexpr, IS_INT: tl.constexpr, K_OUT: tl.constexpr):
        # one program per (token, q-or-kv head): q heads are rotated into q_out, kv heads rotate k and copy v
        # straight into the paged cache (K_OUT: the rotated k also into k_out, for prefill's attention over the
        # new tokens). Replaces ~25 small kernels per layer at decode, more at prefill with a quantized cache.
        t = tl.program_id(0)
        h = tl.program_id(1)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        cs_row = cos_sin_ptr + tl.load(pos_ptr + t).to(tl.int64) * stride_cs
        row = qkv_ptr + t.to(tl.int64) * stride_qkv
        if h < NUM_HEADS:
            q = _rope(row + h * HEAD_DIM, offs_d, dmask, cs_row, HALF)
            tl.store(q_out_ptr + t.to(tl.int64) * stride_qo + h * HEAD_DIM + offs_d,
                     q.to(q_out_ptr.dtype.element_ty), mask=dmask)
        else:
            kq, ksc, vq, vsc, k = _store_new_kv(row, k_cache_ptr, v_cache_ptr, ks_ptr, vs_ptr, cs_row,
                                                tl.load(slot_ptr + t).to(tl.int64), h - NUM_HEADS, stride_slot, offs_d,
                                                dmask, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, HALF, QUANT, QMAX,
                                                MIN_SCALE, IS_INT)
            if K_OUT:
                tl.store(k_out_ptr + t.to(tl.int64) * stride_ko + (h - NUM_HEADS) * HEAD_DIM + offs_d,
                         k.to(k_out_ptr.dtype.element_ty), mask=dmask)


def _store_consts(k_cache: torch.Tensor, quant: bool) -> dict:
    """The cache-format constants of ``_store_head``."""
    return {"QUANT": quant, "QMAX": qmax_of(k_cache.dtype) if quant else 1.0, "MIN_SCALE": MIN_SCALE,
            "IS_INT": k_cache.dtype == torch.int8}


def _refuse_fp8_off_cuda(qkv: torch.Tensor, k_cache: torch.Tensor) -> None:
    """fp8 stores need CUDA: the CPU interpreter's numpy fp8 cast is wrong where rounding carries into the exponent
    (127.6 is stored as 64), so off CUDA fp8 caches are written by ``rope_store_kv_reference``."""
    if k_cache.dtype == torch.float8_e4m3fn and not qkv.is_cuda:
        from onecard.errors import BadInputError

        raise BadInputError("the fused RoPE + fp8 KV store runs on CUDA only; off CUDA use rope_store_kv_reference "
                            "(the engine does unless fused_rope_store=True on a GPU)")


def rope_store_kv_triton(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                         head_dim: int, k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None,
                         return_k: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused RoPE + KV-cache write (Triton); same contract as ``rope_store_kv_reference`` (fp8 caches: CUDA only)."""
    _refuse_fp8_off_cuda(qkv, k_cache)
    T = qkv.shape[0]
    qkv = qkv.contiguous()
    q = torch.empty(T, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(T, num_kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device) if return_k else q
    quant = k_scale is not None
    _rope_store_kernel[(T, num_heads + num_kv_heads)](
        qkv, q, k, k_cache, v_cache, k_scale if quant else k_cache, v_scale if quant else v_cache, cos_sin,
        positions, slot_mapping, qkv.stride(0), q.stride(0), k.stride(0), cos_sin.stride(0), k_cache.stride(1),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=head_dim // 2,
        BLOCK_D=triton.next_power_of_2(head_dim), **_store_consts(k_cache, quant), K_OUT=return_k,
    )
    return (q, k) if return_k else q


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
# the target with one program per (sequence, KV head) still splits its long sequences, into at most
# SPLIT_BIG_BATCH_SPLITS partitions of at least SPLIT_MAX_PARTITION tokens: in an offline batch of mixed lengths the
# longest sequences' walks otherwise ran alone at the end of each launch (1000 prompts, fp8 weights and KV, H100:
# 10,252 -> 10,768 output tok/s with 512-token partitions, 10,622 with 256; a dev A/B, docs/engine.md). Sequences
# shorter than a partition are untouched: the programs past their end exit at once.
# Untuned guesses: benchmarks/kernel_paged_decode.py times a range of partitions to set them from.
SPLIT_TARGET_PROGRAMS = 1024
SPLIT_MAX_PROGRAMS = 4 * SPLIT_TARGET_PROGRAMS
SPLIT_MIN_PARTITION = 128
SPLIT_MAX_PARTITION = 512
SPLIT_BIG_BATCH_SPLITS = 4  # at most this many partitions per sequence once the batch alone fills the target
SPLIT_TILE = 64  # tokens per inner iteration (at least one cache block)
DOT_ROWS = 16  # tl.dot needs >= 16 rows: the GROUP query heads of a KV head are padded to this
# CUDA launch options of the one-launch decode kernel (paged_decode_attention_fused), from
# benchmarks/kernel_decode_attention.py --sweep on an H200.
FUSED_LAUNCH = {"num_warps": 4, "num_stages": 2}
# Launch options of both kernels on the CUDA-core path (MHA over an fp8/int8 cache, _attend_row): one warp per
# (sequence, head) program walks 64-token tiles, from a sweep of warps, stages and tiles at batch 240 x 406 tokens and
# 32 x 2000 on an H200 (1 warp: 3.5 TB/s; 2: 2.9; 4: 1.9).
CUDA_CORE_LAUNCH = {"num_warps": 1, "num_stages": 2}


def split_plan(batch: int, num_kv_heads: int, max_context: int, tile: int) -> tuple[int, int]:
    """(tokens per partition, partitions) for a launch of ``batch x num_kv_heads x partitions`` programs.

    Depends only on shapes (``max_context`` is the block-table width in tokens), never on the context lengths,
    so a CUDA graph captured once replays for any lengths: partitions past a sequence's end simply exit.
    Partitions are whole tiles, as many as fill ``SPLIT_TARGET_PROGRAMS`` within the bounds above (a batch that
    fills it alone: ``SPLIT_BIG_BATCH_SPLITS`` at most)."""
    tiles = max(1, -(-max_context // tile))
    lanes = max(1, batch * num_kv_heads)
    if lanes >= SPLIT_TARGET_PROGRAMS:
        per = min(tiles, max(SPLIT_MAX_PARTITION // tile, 1, -(-tiles // SPLIT_BIG_BATCH_SPLITS)))
        return per * tile, -(-max_context // (per * tile))
    per = max(-(-tiles * lanes // SPLIT_TARGET_PROGRAMS), -(-SPLIT_MIN_PARTITION // tile))
    per = min(per, max(1, SPLIT_MAX_PARTITION // tile))
    per = min(max(per, -(-tiles * lanes // SPLIT_MAX_PROGRAMS)), tiles)
    partition = per * tile
    return partition, -(-max_context // partition)


if triton is not None:

    @triton.jit
    def _tile_blocks(bt_row, start, end, offs_t, BLOCK_SIZE: tl.constexpr):
        # the cache block of each token of the tile at ``start`` (0 past ``end``)
        pos = start + offs_t
        return tl.load(bt_row + pos // BLOCK_SIZE, mask=pos < end, other=0).to(tl.int64)

    @triton.jit
    def _group_layout(kv_head, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_D: tl.constexpr):
        # a KV head's GROUP query heads as rows (padded to BLOCK_G) by head_dim columns (padded to BLOCK_D):
        # (column offsets, column mask, query-head ids, row mask, [BLOCK_G, BLOCK_D] mask)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        gmask = offs_g < GROUP
        dmask = offs_d < HEAD_DIM
        return offs_d, dmask, kv_head * GROUP + offs_g, gmask, gmask[:, None] & dmask[None, :]

    @triton.jit
    def _load_tile(k_ptr, v_ptr, ks_ptr, vs_ptr, bt_row, block, kv_head, start, hi, stride_kb, stride_ks, stride_kh,
                   stride_sb, stride_ss, offs_d, dmask, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
                   QUANT: tl.constexpr):
        # One tile of a partition walk: (token mask, K, V as stored, K and V scales (ones unless QUANT), the next
        # tile's block ids). K and V are issued together and the next ids are requested before the caller's math:
        # each tile is a chain of dependent loads, so the walk is latency-bound at decode.
        offs_t = tl.arange(0, TILE)
        pos = start + offs_t
        tmask = pos < hi
        off = block[:, None] * stride_kb + (pos % BLOCK_SIZE)[:, None] * stride_ks + kv_head * stride_kh \
            + offs_d[None, :]
        mask2 = tmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + off, mask=mask2, other=0.0)
        v = tl.load(v_ptr + off, mask=mask2, other=0.0)
        k_sc = tl.full([TILE], 1.0, tl.float32)
        v_sc = tl.full([TILE], 1.0, tl.float32)
        if QUANT:
            soff = block * stride_sb + (pos % BLOCK_SIZE) * stride_ss + kv_head
            k_sc = tl.load(ks_ptr + soff, mask=tmask, other=0.0).to(tl.float32)
            v_sc = tl.load(vs_ptr + soff, mask=tmask, other=0.0).to(tl.float32)
        return tmask, k, v, k_sc, v_sc, _tile_blocks(bt_row, start + TILE, hi, offs_t, BLOCK_SIZE)

    @triton.jit
    def _attend_row(q, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_row, block, kv_head, lo, hi, stride_kb, stride_ks, stride_kh,
                    stride_sb, stride_ss, offs_d, dmask, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    TILE: tl.constexpr):
        # _attend_partition for one query row (MHA) over a quantized cache, on CUDA cores: codes to fp32 in
        # registers, scales applied in the reduction's own layout. Why: with a single row the tile dots are 1/16
        # useful, and staging the dequantized tiles through shared memory for them capped occupancy, so the fp8
        # kernel read 1.2-1.5 TB/s on an H200 where this reads ~3.5 (benchmarks/kernel_decode_attention_quant.py).
        # ``q`` [BLOCK_D] fp32, the softmax scale folded in. Returns (max, sum, acc [BLOCK_D]), unnormalized.
        m_i = float("-inf")
        l_i = 0.0
        acc = tl.zeros([BLOCK_D], tl.float32)
        for start in range(lo, hi, TILE):
            tmask, k, v, k_sc, v_sc, block = _load_tile(k_ptr, v_ptr, ks_ptr, vs_ptr, bt_row, block, kv_head, start,
                                                        hi, stride_kb, stride_ks, stride_kh, stride_sb, stride_ss,
                                                        offs_d, dmask, BLOCK_SIZE, TILE, True)
            s = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * k_sc
            s = tl.where(tmask, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum((p * v_sc)[:, None] * v.to(tl.float32), axis=0)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _attend_partition(q, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_row, block, kv_head, lo, hi, scale, stride_kb,
                          stride_ks, stride_kh, stride_sb, stride_ss, offs_d, dmask, BLOCK_G: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, QUANT: tl.constexpr,
                          LOW_DOT: tl.constexpr, CUDA_CORES: tl.constexpr):
        # Online softmax of the GROUP query rows ``q`` [BLOCK_G, BLOCK_D] (already in the dot dtype) over cached
        # tokens [lo, hi) of one KV head: each K/V tile is loaded once for all GROUP heads (scores GROUP x TILE by
        # tl.dot, rows padded to BLOCK_G >= 16). Returns the unnormalized (max, sum, acc).
        # ``block`` holds the first tile's ids (the caller loads them early; _load_tile says why the order matters).
        # QUANT: fp8/int8 cache; each token's per-head scale multiplies its score column (K) and weight (V).
        # LOW_DOT: both dots in the query's 16-bit dtype (fp32 accumulate); otherwise exact fp32 dots.
        # CUDA_CORES (MHA over a quantized cache; BLOCK_G == 1): _attend_row instead.
        if CUDA_CORES:
            m_r, l_r, acc_r = _attend_row(tl.sum(q.to(tl.float32), axis=0) * scale, k_ptr, v_ptr, ks_ptr, vs_ptr,
                                          bt_row, block, kv_head, lo, hi, stride_kb, stride_ks, stride_kh, stride_sb,
                                          stride_ss, offs_d, dmask, BLOCK_D, BLOCK_SIZE, TILE)
            m_i = tl.zeros([BLOCK_G], tl.float32) + m_r
            l_i = tl.zeros([BLOCK_G], tl.float32) + l_r
            acc = acc_r[None, :]
        else:
            dt = q.dtype
            m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_G], tl.float32)
            acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
            for start in range(lo, hi, TILE):
                tmask, k, v, k_sc, v_sc, block = _load_tile(k_ptr, v_ptr, ks_ptr, vs_ptr, bt_row, block, kv_head,
                                                            start, hi, stride_kb, stride_ks, stride_kh, stride_sb,
                                                            stride_ss, offs_d, dmask, BLOCK_SIZE, TILE, QUANT)
                k = k.to(tl.float32).to(dt)
                if LOW_DOT:
                    s = tl.dot(q, tl.trans(k))
                else:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                s = s * scale
                if QUANT:
                    s = s * k_sc[None, :]
                s = tl.where(tmask[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                if QUANT:
                    p = p * v_sc[None, :]
                v = v.to(tl.float32).to(dt)
                if LOW_DOT:
                    pv = tl.dot(p.to(dt), v)
                else:
                    pv = tl.dot(p, v, input_precision="ieee")
                acc = acc * alpha[:, None] + pv
                m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _store_partials(m_ptr, l_ptr, acc_ptr, m_i, l_i, acc, seq, heads, split, num_heads, splits, offs_d, gmask,
                        qmask, HEAD_DIM: tl.constexpr):
        # one partition's (max, sum, unnormalized acc) of its GROUP heads, at rows [B, Hq, splits] of the workspace
        row = (seq * num_heads + heads) * splits + split
        tl.store(m_ptr + row, m_i, mask=gmask)
        tl.store(l_ptr + row, l_i, mask=gmask)
        tl.store(acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=qmask)

    @triton.jit
    def _merge_heads(m_ptr, l_ptr, acc_ptr, rows, gmask, n, offs_d, dmask, CHUNK: tl.constexpr,
                     HEAD_DIM: tl.constexpr):
        # log-sum-exp merge of the first n partials of each query head (``rows`` [G]: its first partial's row;
        # ``gmask``: which of the G are heads), CHUNK partials at a time, all heads at once (one dependent load per
        # chunk, not per head), in partition order; .cg loads: other programs wrote them (the L1 may hold stale
        # lines). Returns [G, BLOCK_D].
        offs_c = tl.arange(0, CHUNK)
        m_run = tl.full(rows.shape, float("-inf"), tl.float32)
        total = tl.zeros(rows.shape, tl.float32)
        acc = tl.zeros([rows.shape[0], offs_d.shape[0]], tl.float32)
        for c in range(0, n, CHUNK):
            s = c + offs_c
            idx = rows[:, None] + s[None, :]                                    # [G, CHUNK]
            smask = gmask[:, None] & (s < n)[None, :]
            m = tl.load(m_ptr + idx, mask=smask, other=float("-inf"), cache_modifier=".cg")
            m_new = tl.maximum(m_run, tl.max(m, axis=1))
            alpha = tl.exp(m_run - m_new)
            w = tl.where(smask, tl.exp(m - m_new[:, None]), 0.0)
            total = total * alpha + tl.sum(w * tl.load(l_ptr + idx, mask=smask, other=0.0, cache_modifier=".cg"),
                                           axis=1)
            a = tl.load(acc_ptr + idx[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                        mask=smask[:, :, None] & dmask[None, None, :], other=0.0, cache_modifier=".cg")
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * a, axis=1)
            m_run = m_new
        return acc / total[:, None]

    @triton.jit
    def _paged_split_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, out_ptr, m_ptr, l_ptr, acc_ptr, block_tables_ptr,
                            context_lens_ptr, scale, partition, stride_qb, stride_qh, stride_kb, stride_ks, stride_kh,
                            stride_sb, stride_ss, stride_bt_b, stride_ob, stride_oh, SINGLE: tl.constexpr,
                            GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
                            QUANT: tl.constexpr, LOW_DOT: tl.constexpr, CUDA_CORES: tl.constexpr):
        # One program per (sequence, KV head, partition). SINGLE (one partition) normalizes and writes the output;
        # otherwise the partial goes to the workspace for _paged_combine_kernel.
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
        lo = split * partition
        if lo < ctx:
            offs_d, dmask, heads, gmask, qmask = _group_layout(kv_head, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D)
            q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=qmask, other=0.0)
            q = q.to(q.dtype if LOW_DOT else tl.float32)
            hi = tl.minimum(lo + partition, ctx)
            bt_row = block_tables_ptr + seq * stride_bt_b
            block = _tile_blocks(bt_row, lo, hi, tl.arange(0, TILE), BLOCK_SIZE)
            m_i, l_i, acc = _attend_partition(q, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_row, block, kv_head, lo, hi, scale,
                                              stride_kb, stride_ks, stride_kh, stride_sb, stride_ss, offs_d, dmask,
                                              BLOCK_G, BLOCK_D, BLOCK_SIZE, TILE, QUANT, LOW_DOT, CUDA_CORES)
            if SINGLE:
                tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                         (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=qmask)
            else:
                _store_partials(m_ptr, l_ptr, acc_ptr, m_i, l_i, acc, seq, heads, split, GROUP * tl.num_programs(1),
                                tl.num_programs(2), offs_d, gmask, qmask, HEAD_DIM)

    @triton.jit
    def _paged_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, context_lens_ptr, partition, splits, stride_ob,
                              stride_oh, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per (sequence, query head): merges the partitions the sequence reached; the ones past its end
        # were never written, so they are not read. The partition count is a runtime value: eager steps (block
        # tables as wide as the batch's longest) compile once.
        seq = tl.program_id(0)
        head = tl.program_id(1)
        ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        one = tl.arange(0, 1)
        out = _merge_heads(m_ptr, l_ptr, acc_ptr, (seq * tl.num_programs(1) + head) * splits + one, one == 0,
                           tl.minimum(tl.cdiv(ctx, partition), splits), offs_d, dmask, CHUNK, HEAD_DIM)
        tl.store(out_ptr + seq * stride_ob + head * stride_oh + one[:, None] + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=dmask[None, :])

    @triton.jit
    def _decode_fused_kernel(qkv_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, out_ptr, m_ptr, l_ptr, acc_ptr, count_ptr,
                             cos_sin_ptr, pos_ptr, slot_ptr, block_tables_ptr, context_lens_ptr, scale, partition,
                             width, stride_qkv, stride_cs, stride_kb, stride_ks, stride_kh, stride_sb, stride_ss,
                             stride_bt_b, stride_ob, stride_oh, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                             GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, QUANT: tl.constexpr,
                             QMAX: tl.constexpr, MIN_SCALE: tl.constexpr, IS_INT: tl.constexpr,
                             LOW_DOT: tl.constexpr, MERGE_G: tl.constexpr, CHUNK: tl.constexpr,
                             CUDA_CORES: tl.constexpr, PDL: tl.constexpr):
        # _rope_store_kernel + _paged_split_kernel + _paged_combine_kernel as one launch, one program per
        # (sequence, KV head, partition): each program rotates its GROUP query heads from the fused q|k|v row; the
        # partition holding the new token writes that token's K/V to the cache and attends to it from registers, as
        # stored (quantized, when the cache is), instead of reading it back; a sequence within one partition writes
        # its output at once, otherwise the last of its partitions to finish (the counter) merges every partial and
        # resets the counter. Latency first: what does not need the context length (the tile-0 block ids, masked by
        # the table width) is requested at the start.
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        lo = split * partition
        # Before the wait for the qkv GEMV: the step's lengths, positions and block table, copied in before the
        # step and written by none of its kernels, so their loads overlap the GEMV's tail (H100 dev A/B, bs=1:
        # int4 2.411 -> 2.405 ms/token, int8 3.482 -> 3.464, fp8 unchanged). Loading the partition's first cached
        # tile here too (its loop peeled) gained int4 bs=16 2 % but cost fp8 bs=1 1 %, whose cuBLAS GEMV ahead
        # gives nothing to overlap.
        ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
        token_pos = tl.load(pos_ptr + seq).to(tl.int64)
        bt_row = block_tables_ptr + seq * stride_bt_b
        block = _tile_blocks(bt_row, lo, width, tl.arange(0, TILE), BLOCK_SIZE)
        if lo < ctx:
            wait_for_inputs(PDL)
            offs_d, dmask, heads, gmask, qmask = _group_layout(kv_head, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D)
            cs_row = cos_sin_ptr + token_pos * stride_cs
            row = qkv_ptr + seq.to(tl.int64) * stride_qkv
            q = _rope(row + heads[:, None] * HEAD_DIM, offs_d[None, :], qmask, cs_row, HALF)
            q = q.to(qkv_ptr.dtype.element_ty)  # as rope_store_kv writes it
            q = q.to(q.dtype if LOW_DOT else tl.float32)
            hi = tl.minimum(lo + partition, ctx)
            m_i, l_i, acc = _attend_partition(q, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_row, block, kv_head, lo,
                                              tl.minimum(hi, ctx - 1), scale, stride_kb, stride_ks, stride_kh,
                                              stride_sb, stride_ss, offs_d, dmask, BLOCK_G, BLOCK_D, BLOCK_SIZE, TILE,
                                              QUANT, LOW_DOT, CUDA_CORES)
            if hi == ctx:  # this partition holds the new token: store it, and fold it in as stored
                kq, k_sc, vq, v_sc, _ = _store_new_kv(row, k_ptr, v_ptr, ks_ptr, vs_ptr, cs_row,
                                                   tl.load(slot_ptr + seq).to(tl.int64), kv_head, stride_ks, offs_d,
                                                   dmask, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, HALF, QUANT, QMAX,
                                                   MIN_SCALE, IS_INT)
                s_new = tl.sum(q.to(tl.float32) * kq.to(tl.float32)[None, :], axis=1) * scale
                p_v = tl.full([BLOCK_G], 1.0, tl.float32)
                if QUANT:
                    s_new = s_new * k_sc.to(tl.float32)
                    p_v = p_v * v_sc.to(tl.float32)
                m_new = tl.maximum(m_i, s_new)
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s_new - m_new)
                l_i = l_i * alpha + p
                acc = acc * alpha[:, None] + (p * p_v)[:, None] * vq.to(tl.float32)[None, :]
                m_i = m_new
            # the next kernel launches after the walk, so its waiting programs hold no SM slot this grid's later
            # programs need (H100, quant_decode.py, two runs against one: int4 bs=1 2.42 -> 2.40-2.41 ms/token,
            # int8 3.51 -> 3.47-3.48, bf16 unchanged)
            let_next_start(PDL)
            n = tl.cdiv(ctx, partition)
            if n == 1:
                tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                         (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=qmask)
            else:
                splits = tl.num_programs(2)
                _store_partials(m_ptr, l_ptr, acc_ptr, m_i, l_i, acc, seq, heads, split, NUM_HEADS, splits, offs_d,
                                gmask, qmask, HEAD_DIM)
                tl.debug_barrier()  # every thread's partial is written before the counter moves
                unit = seq * NUM_KV_HEADS + kv_head
                if tl.atomic_add(count_ptr + unit, 1, sem="acq_rel") == n - 1:
                    offs_m = tl.arange(0, MERGE_G)
                    mheads = kv_head * GROUP + offs_m
                    o = _merge_heads(m_ptr, l_ptr, acc_ptr, (seq * NUM_HEADS + mheads) * splits, offs_m < GROUP, n,
                                     offs_d, dmask, CHUNK, HEAD_DIM)
                    tl.store(out_ptr + seq * stride_ob + mheads[:, None] * stride_oh + offs_d[None, :],
                             o.to(out_ptr.dtype.element_ty), mask=(offs_m < GROUP)[:, None] & dmask[None, :])
                    tl.atomic_xchg(count_ptr + unit, 0)



def _split_launch(B: int, Hq: int, D: int, k_cache: torch.Tensor, block_tables: torch.Tensor, device: torch.device,
                  partition: int | None, plan_rows: int | None, quant: bool,
                  cuda_cores: bool | None) -> tuple[int, int, tuple[torch.Tensor, ...], dict]:
    """(partition, splits, the (max, sum, acc) workspace, the launch constants both split kernels share).
    ``cuda_cores``: None picks _attend_row for MHA over a quantized cache; True/False force it (benchmarks, tests)."""
    if triton is None:
        from onecard.errors import MissingExtraError

        raise MissingExtraError("triton is not installed; install it with: pip install triton")
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
    work = (B * Hq * splits) if splits > 1 else 1
    workspace = (torch.empty(work, dtype=torch.float32, device=device),
                 torch.empty(work, dtype=torch.float32, device=device),
                 torch.empty(work * (D if splits > 1 else 1), dtype=torch.float32, device=device))
    group = Hq // Hkv
    one_row = quant and group == 1  # what the CUDA-core walk serves
    if cuda_cores is None:
        cuda_cores = one_row
    elif cuda_cores and not one_row:
        from onecard.errors import BadInputError

        raise BadInputError("cuda_cores=True needs one query head per KV head and an fp8/int8 cache; leave it None")
    consts = {"GROUP": group, "BLOCK_G": 1 if cuda_cores else max(DOT_ROWS, triton.next_power_of_2(group)),
              "HEAD_DIM": D, "BLOCK_D": triton.next_power_of_2(D), "BLOCK_SIZE": block_size, "TILE": tile,
              "CUDA_CORES": cuda_cores}
    return partition, splits, workspace, consts


def _low_dot(x: torch.Tensor) -> bool:
    """bf16/fp16 dots run on CUDA only: the CPU interpreter's bf16 ``tl.dot`` returns garbage, so there they are fp32."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def paged_decode_attention_split(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                                 partition: int | None = None, plan_rows: int | None = None,
                                 cuda_cores: bool | None = None) -> torch.Tensor:
    """Flash-decoding over the paged cache (Triton): same contract as ``paged_decode_attention_reference``.

    The grid is (B, Hkv, partitions) with partitions from ``split_plan`` over the block-table width, so it is
    fixed for a captured CUDA graph (the engine's static block table is max_model_len wide). ``partition``
    (tokens, a multiple of ``SPLIT_TILE``) overrides the plan, for tests and benchmarks; ``plan_rows`` plans it as
    for that many rows instead of ``B`` (a row's sums then run in the same order as in a ``plan_rows``-row launch,
    whatever else is in the batch). ``cuda_cores``: None walks MHA over an fp8/int8 cache on CUDA cores
    (``_attend_row``) and everything else through tile dots; True/False force the choice (True: MHA + quantized
    cache only)."""
    B, Hq, D = q.shape
    quant = k_scale is not None
    partition, splits, (m, lsum, acc), consts = _split_launch(B, Hq, D, k_cache, block_tables, q.device, partition,
                                                              plan_rows, quant, cuda_cores)
    q = q.contiguous()
    out = torch.empty_like(q)
    ks, vs = (k_scale, v_scale) if quant else (k_cache, v_cache)  # unread placeholders when not quantized
    _paged_split_kernel[(B, k_cache.shape[2], splits)](
        q, k_cache, v_cache, ks, vs, out, m, lsum, acc, block_tables, context_lens, scale, partition,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        ks.stride(0), ks.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        SINGLE=splits == 1, QUANT=quant, LOW_DOT=_low_dot(q), **consts,
        **(CUDA_CORE_LAUNCH if consts["CUDA_CORES"] and q.is_cuda else {}),
    )
    if splits > 1:
        _paged_combine_kernel[(B, Hq)](
            m, lsum, acc, out, context_lens, partition, splits, out.stride(0), out.stride(1),
            CHUNK=16, HEAD_DIM=D, BLOCK_D=consts["BLOCK_D"],
        )
    return out


def paged_decode_attention_fused(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                                 k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                                 block_tables: torch.Tensor, context_lens: torch.Tensor, num_heads: int,
                                 num_kv_heads: int, head_dim: int, scale: float, k_scale: torch.Tensor | None = None,
                                 v_scale: torch.Tensor | None = None, partition: int | None = None,
                                 plan_rows: int | None = None, launch: dict | None = None,
                                 cuda_cores: bool | None = None) -> torch.Tensor:
    """A decode step's attention from the fused q|k|v rows ``[B, (Hq + 2 Hkv) D]`` in one launch: RoPE, the new
    token's K/V into the cache, flash-decoding and the merge of its partitions; returns ``[B, Hq, D]``.
    No row may attend to another row's new token: the launch stores and reads them in no set order (speculative
    verify rows would; ``EngineConfig.fuses_decode_attention`` keeps the three-launch path there).

    Same result as ``rope_store_kv_triton`` then ``paged_decode_attention_split`` (same partitions; the new token's
    score and weight are summed in fp32 from registers, not through the tile dots): a bs=1 decode step is bound by
    a few microseconds of latency per launch, and this is one launch where that path takes three. ``launch``: CUDA
    launch options (default ``FUSED_LAUNCH``, ``CUDA_CORE_LAUNCH`` on that path); ``cuda_cores``: as in
    ``paged_decode_attention_split``. fp8 caches: CUDA only."""
    _refuse_fp8_off_cuda(qkv, k_cache)
    B = qkv.shape[0]
    quant = k_scale is not None
    partition, splits, (m, lsum, acc), consts = _split_launch(B, num_heads, head_dim, k_cache, block_tables,
                                                              qkv.device, partition, plan_rows, quant, cuda_cores)
    qkv = qkv.contiguous()
    out = torch.empty(B, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    ks, vs = (k_scale, v_scale) if quant else (k_cache, v_cache)  # unread placeholders when not quantized
    counters = zeroed_counters(qkv.device, B * num_kv_heads, "paged_decode")
    launch = launch or (CUDA_CORE_LAUNCH if consts["CUDA_CORES"] else FUSED_LAUNCH)
    merge_g = triton.next_power_of_2(num_heads // num_kv_heads)  # the merge holds [merge_g, CHUNK, D] partials
    _decode_fused_kernel[(B, num_kv_heads, splits)](
        qkv, k_cache, v_cache, ks, vs, out, m, lsum, acc, counters, cos_sin, positions, slot_mapping, block_tables,
        context_lens, scale, partition, block_tables.shape[1] * k_cache.shape[1], qkv.stride(0), cos_sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), ks.stride(0), ks.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=head_dim // 2, LOW_DOT=_low_dot(qkv),
        MERGE_G=merge_g, CHUNK=max(1, 16 // merge_g),
        **_store_consts(k_cache, quant), **consts, **(launch if qkv.is_cuda else {}),
        **pdl_launch(qkv),
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
