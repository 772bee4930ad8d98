"""Weight-only int4 / int8 matmul with fused dequantization (Triton), beside its PyTorch reference.

Why: decoding is memory-bound — each step streams every weight once — so
reading 4-bit (or 8-bit) codes instead of bf16 cuts the bytes per token ~4x
(~2x) if the dequantization happens in registers, never in memory, and costs
fewer instructions than the bytes it saves take to arrive.

Kernel layout (what ``onecard.quant.linear.QuantLinear`` repacks checkpoints into at load time):

- ``qweight`` int32 ``[K / P, N]`` with ``P = 32 / bits`` codes per word, packed along K
  (input channel ``P*r + j`` in bits ``bits*j ..`` of row ``r``). A program reads
  whole rows of words: consecutive threads read consecutive output columns, so
  loads are coalesced and each word feeds ``P`` multiply-adds.
- ``scales``, ``zeros`` ``[G, N]`` (fp16; zeros are exact small integers), groups
  *contiguous*: input channel ``k`` belongs to group ``k // group_size``. Act-order
  checkpoints are made contiguous at load time by permuting K (rows of the codes)
  and gathering the activations with the same permutation.
- ``w[k, n] = (code - zeros[g, n]) * scales[g, n]``.

How the kernels stay cheap per element:

- No ``tl.reshape`` of unpacked codes: a tile of ``BLOCK_KP`` word rows is loaded
  once and code ``j`` of every word (input channel ``P*r + j``) is taken with a
  shift and a mask; the matching activations ``x[P*r + j]`` are a strided load
  (x is tiny and stays in L1).
- Code to float without an int->float conversion (a quarter-rate instruction):
  ``(code | 0x4B000000)`` read as fp32 is exactly ``2**23 + code``, so one
  subtraction of ``zero + 2**23`` gives ``code - zero`` exactly.
- The scale is factored out of the sum: a tile that lies inside one group
  accumulates ``sum_k x_k (c_kn - z_n)`` and multiplies by ``s_n`` once per tile,
  not once per element. (Folding the zero into the conversion, rather than
  subtracting ``z_n * sum_k x_k`` at the end of a group, needs no cross-thread
  sum per group.) Tiles wider than a small group (``ROWWISE``) load one scale
  and zero per word row instead.

Four kernels, chosen per ``M`` from ``CONFIGS`` (tuned by ``benchmarks/quant_kernels.py --sweep``):

- ``gemv`` (decode, M <= a few rows): no tensor cores; a ``[BLOCK_M, BLOCK_KP, BLOCK_N]``
  fp32 accumulator of products, summed over K once at the end. Every tensor is
  3-D from its load on, so the whole loop stays in the words' coalesced layout
  (checked on the sm_90 TTGIR: no ``convert_layout`` inside the loop, no spills).
  At M = 1 the kernel is bound by integer instructions, not bytes (the H200
  sweep found it at ~1.3 TB/s with 8 SASS instructions per 4-bit code), so a
  code costs one shift, one LOP3 and one FMA: shifted into the top mantissa
  bits of 1.0 it *is* the float ``f = 1 + code / 2**bits``, and
  ``sum_j x_j (c_j - z) = 2**bits * sum_j x_j f_j - (2**bits + z) * sum_j x_j``
  takes the zero (and the 1) out per word row, not per code; the cancellation
  costs a few of fp32's 24 bits (6 instructions per code in the sm_90 SASS).
- ``gemv_bf16x2`` (M <= 2; where ``packed_bf16_ok``: 4-bit codes, bf16 or fp16 ``x`` (fp16 rounds to bf16 as
  it loads), an Ampere-or-later GPU; elsewhere the ``gemv`` runs the same tiles): the same walk with the per-word math in packed bf16x2 PTX
  (``_BF16X2_DEQUANT8``, then ``_BF16X2_DOT8`` per row of x): one LOP3 turns two codes into two bf16
  ``128 + code``, one FMA subtracts ``128 + zero`` exactly, and one FMA multiplies and adds two codes at once.
  The sm_90 SASS of the M = 1 config counts 3.9 instructions per code (the ``gemv``: 5.5); with the next tile's
  words prefetched, a Llama-2-7B layer's four M = 1 GEMVs take 59.4 µs instead of 73.3 (graph-timed, H100; the
  bf16 GEMV: 138). The cost is rounding: each four-term chain rounds to bf16 (``wo_matmul_bf16x2_reference``
  models it step by step), ~3e-3 relative error against the fp32 ``gemv``'s ~1.7e-3 (the bf16 output's own).
- ``dot``: ``P`` separate ``tl.dot`` of ``x_j [BLOCK_M, BLOCK_KP] @ (c_j - z) [BLOCK_KP, BLOCK_N]``
  (codes minus zero are exact in bf16 for 4- and 8-bit codes), scale after the dot
  (within the dot each ``c_j - z`` tile still passes through shared memory, as any
  Triton dequant-then-dot does). Where ``packed_bf16_ok`` and a tile holds one group, the codes come from
  ``_BF16X2_DEQUANT8``, two per instruction, split into the eight tiles by register moves (x as bf16): a Llama-2-7B layer
  at M = 8 took 105.0 µs against 136.7 for the fp32 conversion with its best tile (H100).
- ``dot_t``: the ``dot`` transposed, ``out^T = (c - z)^T @ x^T``, for tiles inside one group: with the weight
  as the first operand a wide ``BLOCK_N`` fills Hopper's wgmma instead of an MMA padded to 16 rows of x.

All four split K over groups when the output tiles alone would leave SMs idle
(``KernelConfig.waves``): each split writes an fp32 partial and the last to
finish sums them (``_store_out``), so a split-K matmul is one kernel, with no
memset or cast around it. All four take part in the decode step's chain of
programmatic dependent launches (``kernels.launch``; ``KernelConfig.pdl``):
the gemv kernels load their first weight tile (``prefetch``) before they wait
for the previous kernel, since no decode kernel writes weights, and each lets
the next kernel launch only once its loop is done. On CUDA, from ``dequant_min_rows`` (prefill, and
decode batches of 65+ sequences, or 32+ where tiles span groups) ``wo_matmul`` dequantizes into a scratch weight
and calls cuBLAS, as exllamav2 does: the dequantize kernel writes bf16 at ~2.3 TB/s on an
H100 (97 us for a 7B gate/up), where the ``dot`` kernel took ~1.2 ms per layer
at M = 64 against ~0.19 ms for bf16 cuBLAS; at 1000-prompt offline throughput
this took int4 from 1,692 to 4,346 tok/s (M >= 16 gave 4,158; dev A/B, H100).
The scratch weight (the largest layer's, once) is memory that start-up and the
planner set aside: ``dequant_scratch_bytes``. Below that, on an Ampere-or-later
GPU with bf16 x, int4 g128 at 2-64 rows and int8 per-channel at 1-32 rows run
the Gluon tensor-core kernel of ``kernels.wo_mma`` instead of this table.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from onecard.errors import BadInputError
from onecard.kernels.counters import zeroed_counters
from onecard.kernels.launch import let_next_start, pdl_launch, wait_for_inputs

DEQUANT_GEMM_MIN_M = 65          # where dequantize + cuBLAS beats dot_t (tiles inside one group; CONFIGS comment)
DEQUANT_GEMM_MIN_M_ROWWISE = 32  # ... and beats the dot, which tiles spanning several groups run (g32, g64 int4)
KERNELS = ("gemv", "gemv_bf16x2", "dot", "dot_t")


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration of ``wo_matmul`` (all block sizes powers of two).

    ``block_kp`` counts packed rows (int32 words along K): a tile spans
    ``block_kp * 32 / bits`` input channels. ``waves`` is the split-K target in
    programs per SM (0 = no split): split-K is set from it per shape, so one
    table row serves every ``N x K``.
    """

    kernel: str        # "gemv" (CUDA cores, small M), "gemv_bf16x2" (4-bit, bf16 x, CUDA), "dot" (tl.dot tiles) or
    #                    "dot_t" (the same with the weight as the dot's first operand; tiles inside one group)
    block_m: int
    block_n: int
    block_kp: int
    waves: float
    num_warps: int = 4
    num_stages: int = 3
    prefetch: bool = False  # the gemv kernels: load the next tile's words before this tile's math
    pdl: bool = True        # take part in programmatic dependent launch where the GPU has it (kernels.launch)

    def __post_init__(self) -> None:
        sizes = (self.block_m, self.block_n, self.block_kp)
        if self.kernel not in KERNELS or any(s < 1 or s & (s - 1) for s in sizes) or self.waves < 0:
            raise BadInputError(f"bad kernel config {self}: kernel {'|'.join(KERNELS)}, power-of-two blocks, "
                                "waves >= 0")
        if self.kernel in ("dot", "dot_t") and min(sizes) < 16:
            raise BadInputError(f"bad kernel config {self}: tl.dot needs block_m, block_n, block_kp >= 16")


# (largest M of the bucket, bits) -> config. M <= 16: swept on an H200 (graph-timed, superseded/quant_kernels_c53d4c5.json),
# (1, 4) re-swept on an H100 for gemv_bf16x2 (36 configs with and without prefetch, one Llama-2-7B layer: this one
# 59.4 us, the best without prefetch 62.4; prefetch lost at M = 2),
# (2, 4) from four of them (75.4 us against the gemv row's 92.9); (4..16, 4) re-swept on an H100 for the dot kernel's
# bf16x2 dequantization, which needs one group per tile (kp16 at g128): 24 configs, the best at every M (one
# Llama-2-7B layer: M=4 96.7 us, M=8 105.0, M=16 134.5, against the kp32 rows' 119.2, 136.7 and 151.4);
# then the transposed dot_t against those rows (18 configs each, H100, one layer): int4 M=8 93.4 us vs 100.4,
# M=16 110.6 vs 134.3 (M=4 kept the dot: 89.7 vs 99.6); int8 per-channel M=4 113.2 vs 126.3, M=8 123.0 vs 130.2,
# M=16 124.3 vs 188.2;
# PDL (each kernel waits for its inputs after loading its first weight tile and lets the next kernel launch once its
# loop is done; quant_decode.py A/B on one H100): int4 bs=1 decode 2.63 -> 2.43 ms/token, int8 bs=1 3.65 -> 3.51,
# int4 bs=16 +5 %, but int8 bs=16 -4 % (two runs), so the int8 dot_t rows launch without it. Letting the next kernel
# launch at the start instead (as the other decode kernels do) made int4 bs=1 slower: 2.99 ms, its waiting programs
# took slots from the GEMV's own later waves. (1, 8) with prefetch, so its first tile also loads before the wait:
# int8 bs=1 3.424/3.425 -> 3.364/3.365 ms (two pairs, one H100, .device A/B); loading two tiles ahead instead
# made int4 bs=1 2.36 -> 2.69 ms and int8 3.37 -> 3.47 (register pressure), so the depth stays one tile.
# M 17-64: dot_t with 32-row tiles, swept on an H200 (.device/mid_m.py, 4-8 configs per row, one Llama-2-7B layer,
# graph-timed with L2 flushed; bf16 cuBLAS 139 us at both M): int4 M=32 167.4 us against the dequantize path's 276.4,
# M=64 268.2 against 280.1; int8 per-channel 168.5 against 299.2 and 262.1 against 303.8. At M=128 the dequantize
# path wins (int4 287.9 against 446.1, int8 310.5 against 445.2): DEQUANT_GEMM_MIN_M. Larger M without CUDA: defaults.
# `benchmarks/quant_kernels.py --sweep` prints this table measured on the card it runs on.
CONFIGS: dict[tuple[int, int], KernelConfig] = {
    (1, 4): KernelConfig("gemv_bf16x2", 1, 32, 32, 4.0, 4, 4, prefetch=True),
    (1, 8): KernelConfig("gemv", 1, 64, 16, 8.0, 4, 4, prefetch=True),
    (2, 4): KernelConfig("gemv_bf16x2", 2, 32, 32, 4.0, 4, 4),
    (2, 8): KernelConfig("gemv", 2, 64, 32, 4.0, 4, 4),
    (4, 4): KernelConfig("dot", 16, 128, 16, 2.0, 8, 3),
    (4, 8): KernelConfig("dot_t", 16, 128, 32, 2.0, 8, 3, pdl=False),
    (8, 4): KernelConfig("dot_t", 16, 256, 16, 2.0, 4, 3),
    (8, 8): KernelConfig("dot_t", 16, 64, 32, 4.0, 4, 3, pdl=False),
    (16, 4): KernelConfig("dot_t", 16, 256, 16, 2.0, 4, 3),
    (16, 8): KernelConfig("dot_t", 16, 64, 32, 4.0, 4, 3, pdl=False),
    (32, 4): KernelConfig("dot_t", 32, 256, 16, 2.0, 4, 3),
    (32, 8): KernelConfig("dot_t", 32, 64, 32, 4.0, 4, 3, pdl=False),
    (64, 4): KernelConfig("dot_t", 32, 128, 16, 2.0, 8, 3),
    (64, 8): KernelConfig("dot_t", 32, 64, 32, 4.0, 4, 3, pdl=False),
    (2**31, 4): KernelConfig("dot", 64, 128, 16, 0.0, 4, 3),
    (2**31, 8): KernelConfig("dot", 64, 128, 16, 0.0, 4, 3),
}


def pick_config(M: int, bits: int) -> KernelConfig:
    """The table row of the smallest M bucket that holds ``M``."""
    return CONFIGS[min(m for m, b in CONFIGS if b == bits and m >= M), bits]


# ---- PyTorch reference -------------------------------------------------------------------------------------

def unpack_reference(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[K / P, N]`` -> int32 codes ``[K, N]``."""
    per = 32 // bits
    shifts = (torch.arange(per, device=qweight.device, dtype=torch.int32) * bits).view(1, per, 1)
    codes = (qweight.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1, qweight.shape[1])


def dequantize_reference(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                         group_size: int) -> torch.Tensor:
    """The fp32 weight ``[K, N]`` the kernel computes with."""
    codes = unpack_reference(qweight, bits)
    g = torch.arange(codes.shape[0], device=codes.device) // group_size
    return (codes.float() - zeros.float()[g]) * scales.float()[g]


def wo_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        bits: int, group_size: int) -> torch.Tensor:
    """``x[..., K] @ W[K, N]`` with W dequantized in fp32 and cast to x's dtype."""
    w = dequantize_reference(qweight, scales, zeros, bits, group_size).to(x.dtype)
    return x @ w


def _round_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def wo_matmul_bf16x2_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                               group_size: int) -> torch.Tensor:
    """What the ``gemv_bf16x2`` kernel computes for bf16 or fp16 ``x[M, K]`` (rounded to bf16 first) and 4-bit W,
    rounding step by step (fp32 out).

    Per word (input channels ``8r .. 8r+7``) two bf16 chains of four fused multiply-adds, over channels
    ``8r .. 8r+3`` and ``8r+4 .. 8r+7`` (the halves of the packed pairs), each step rounded to bf16; the two
    sums meet in fp32 and take the group's scale there. ``code - zero`` is exact in bf16, so the only
    roundings are the chains': about 2**-9 of each four-term partial, where the fp32 ``gemv`` rounds nothing
    before its output.
    """
    codes = unpack_reference(qweight, 4)
    K, N = codes.shape
    g = torch.arange(K, device=codes.device) // group_size
    d = (codes.float() - zeros.float()[g]).view(K // 8, 2, 4, N)        # [word, half, step, N]
    xs = x.to(torch.bfloat16).float().view(x.shape[0], K // 8, 2, 4, 1)
    a = torch.zeros(x.shape[0], K // 8, 2, N, device=x.device)
    for i in range(4):
        a = _round_bf16(xs[:, :, :, i] * d[:, :, i] + a)                 # fma.rn.bf16x2: one rounding per step
    part = a.sum(dim=2)                                                  # [M, word, N], fp32
    return (part * scales.float()[g[::8]]).sum(dim=1)


# ---- Triton ------------------------------------------------------------------------------------------------

@triton.jit
def _group_affine(s_ptr, z_ptr, kp0, rows, offs_n, n_mask, N, KPT, GROUP: tl.constexpr, PACK: tl.constexpr,
                  ROWWISE: tl.constexpr, PER_ROW: tl.constexpr):
    """Scale and zero (fp32) for a tile of word rows.

    ``rows`` and ``offs_n``/``n_mask`` come already expanded (``[BKP, 1]`` / ``[1, BN]``, or with a
    leading 1 for 3-D tiles). ``PER_ROW`` loads a one-group tile's scales once per word row (L1 hits),
    shaped like the words so the compiler keeps the words' layout (the gemv); otherwise once per tile
    (the dot, whose accumulator has its own layout).
    """
    if ROWWISE:    # the tile spans several groups: one scale/zero per word row (a word never straddles groups)
        off = (rows * PACK) // GROUP * N + offs_n
        mask = (rows < KPT) & n_mask
    elif PER_ROW:  # the whole tile lies in group kp0 * PACK // GROUP
        off = (kp0 * PACK) // GROUP * N + offs_n + rows * 0
        mask = (rows < KPT) & n_mask
    else:
        off = (kp0 * PACK) // GROUP * N + offs_n
        mask = n_mask & ((tl.zeros_like(offs_n) + kp0) < KPT)
    s = tl.load(s_ptr + off, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + off, mask=mask, other=0.0).to(tl.float32)
    return s, z


@triton.jit
def _code_minus_zero(words, j: tl.constexpr, zm, BITS: tl.constexpr):
    """``code_j - zero`` in fp32, exact: ``(code | 0x4B000000)`` read as fp32 is ``2**23 + code``, and the caller
    passes ``zm = zero + 2**23`` (once per tile, not per code)."""
    return (((words >> (j * BITS)) & ((1 << BITS) - 1)) | 0x4B000000).to(tl.float32, bitcast=True) - zm


@triton.jit
def _store_out(out_ptr, part_ptr, count_ptr, y, offs_m, offs_n, M, N, stride_om, num_splits, SPLIT: tl.constexpr):
    """Write a tile; under split-K, the last of its splits to finish sums every split's partial and writes it.

    Why not ``atomic_add`` into a zeroed fp32 output: that needs a memset and a
    cast kernel around every matmul, and in a captured decode step those two
    launches cost about as much as the matmul's own time. Here each split
    stores its fp32 partial, bumps the tile's counter (acquire-release), and
    the split that sees ``num_splits - 1`` sums the partials in split order
    (deterministic, unlike atomics), writes the output in its dtype and resets
    the counter to zero for the next call.
    """
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT:
        mn = offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + tl.program_id(2) * M * N + mn, y, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == num_splits - 1:
            total = tl.zeros_like(y)
            for k in range(num_splits):
                total += tl.load(part_ptr + k * M * N + mn, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], total.to(out_ptr.dtype.element_ty),
                     mask=mask)
            tl.atomic_xchg(count_ptr + tile, 0)
    else:
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A program's rows and columns of the output, with their masks."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def _k_rows(t, tiles_per_split, KPT, BLOCK_KP: tl.constexpr):
    """Tile ``t`` of this program's split of K: its first word row, its word rows and their mask."""
    kp0 = (tl.program_id(2) * tiles_per_split + t) * BLOCK_KP
    rows = kp0 + tl.arange(0, BLOCK_KP)
    return kp0, rows, rows < KPT


@triton.jit
def _gemv_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A gemv program's rows and columns, 1-D and as the 3-D ``[BLOCK_M, BLOCK_KP, BLOCK_N]`` broadcasts: every
    tensor is 3-D from its load on, so the compiler keeps the coalesced layout of the words load throughout (a
    2-D load expanded to 3-D costs a shared-memory shuffle per code)."""
    offs_m, offs_n, _, _ = _dot_tile(M, N, BLOCK_M, BLOCK_N)
    n3 = offs_n[None, None, :]
    return offs_m, offs_n, offs_m[:, None, None], n3, n3 < N


@triton.jit
def _first_words(qw_ptr, row0, KPT, N, n3, n_mask, BLOCK_KP: tl.constexpr, PREFETCH: tl.constexpr):
    """Under ``PREFETCH`` the words of a program's first tile (loaded before its loop), else nothing."""
    first = 0
    if PREFETCH:
        rows = row0 + tl.arange(0, BLOCK_KP)[None, :, None]
        first = tl.load(qw_ptr + rows * N + n3, mask=(rows < KPT) & n_mask, other=0)
    return first


@triton.jit
def _tile_words(qw_ptr, nxt, pid_k, t, tiles_per_split, KPT, N, n3, n_mask, BLOCK_KP: tl.constexpr,
                PREFETCH: tl.constexpr):
    """Tile ``t`` of split ``pid_k``: its first word row, its rows (``[1, BKP, 1]``), its words, and what to carry
    to the next iteration: under ``PREFETCH`` the words loaded last time and the next tile's, loaded now (rows
    from the next split's first on are not this split's), so one tile is in flight while this one's math runs."""
    kp0, rows, _ = _k_rows(t, tiles_per_split, KPT, BLOCK_KP)
    rows = rows[None, :, None]
    if PREFETCH:
        ahead = rows + BLOCK_KP
        split_end = (pid_k + 1) * tiles_per_split * BLOCK_KP
        words = nxt
        nxt = tl.load(qw_ptr + ahead * N + n3, mask=(ahead < KPT) & (ahead < split_end) & n_mask, other=0)
    else:
        words = tl.load(qw_ptr + rows * N + n3, mask=(rows < KPT) & n_mask, other=0)
    return kp0, rows, words, nxt


@triton.jit(do_not_specialize=["tiles_per_split", "num_splits"])  # one compile per config, whatever the split
def _wo_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_om,
                    tiles_per_split, num_splits, GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr, ROWWISE: tl.constexpr, SPLIT: tl.constexpr,
                    PREFETCH: tl.constexpr, ONE_GROUP: tl.constexpr, PDL: tl.constexpr):
    """``ONE_GROUP`` (one group spans K: per-channel int8): the scale and zero are applied once, after the loop,
    to the whole sums instead of once per word row (their loads, conversions and FMAs were ~1.7 of the ~4.7
    instructions per 8-bit code). ``PREFETCH`` as in ``_wo_gemv_bf16x2_kernel``."""
    PACK: tl.constexpr = 32 // BITS
    LEVELS: tl.constexpr = 1 << BITS
    FIELD: tl.constexpr = 23 - BITS                      # a code's place in an fp32 mantissa: its top bits
    FIELD_MASK: tl.constexpr = (LEVELS - 1) << FIELD
    pid_k = tl.program_id(2)
    offs_m, offs_n, m3, n3, n_mask = _gemv_tile(M, N, BLOCK_M, BLOCK_N)
    KPT = K // PACK
    acc = tl.zeros((BLOCK_M, BLOCK_KP, BLOCK_N), dtype=tl.float32)
    x_acc = tl.zeros((BLOCK_M, BLOCK_KP, 1), dtype=tl.float32)
    nxt = _first_words(qw_ptr, pid_k * tiles_per_split * BLOCK_KP, KPT, N, n3, n_mask, BLOCK_KP, PREFETCH)
    wait_for_inputs(PDL)  # weights are never written by a decode kernel: only x, the partials and counters wait
    for t in range(tiles_per_split):
        kp0, rows, words, nxt = _tile_words(qw_ptr, nxt, pid_k, t, tiles_per_split, KPT, N, n3, n_mask, BLOCK_KP,
                                            PREFETCH)                                    # words [1, BKP, BN]
        r_mask = rows < KPT
        x_rows = x_ptr + m3 * stride_xm + rows * PACK  # [BM, BKP, 1]; x[P*r + j] is x_rows + j
        x_mask = (m3 < M) & r_mask
        if ONE_GROUP:  # straight into the running sums
            part = acc
            x_sum = x_acc
        else:
            part = tl.zeros((BLOCK_M, BLOCK_KP, BLOCK_N), dtype=tl.float32)
            x_sum = tl.zeros((BLOCK_M, BLOCK_KP, 1), dtype=tl.float32)
        for j in tl.static_range(PACK):
            # 1 + code_j / 2**BITS, exact: code_j moved into the top mantissa bits of 1.0 (a shift and one LOP3)
            if FIELD >= j * BITS:
                f = words << (FIELD - j * BITS)
            else:
                f = words >> (j * BITS - FIELD)
            f = ((f & FIELD_MASK) | 0x3F800000).to(tl.float32, bitcast=True)
            xj = tl.load(x_rows + j, mask=x_mask, other=0.0).to(tl.float32)
            part += xj * f
            x_sum += xj
        # sum_j x_j (code_j - zero) = 2**BITS * sum_j x_j f_j - (2**BITS + zero) * sum_j x_j
        if ONE_GROUP:
            acc = part
            x_acc = x_sum
        else:
            s, z = _group_affine(s_ptr, z_ptr, kp0, rows, n3, n_mask, N, KPT, GROUP, PACK, ROWWISE, True)
            acc += (part * LEVELS - (z + LEVELS) * x_sum) * s
    y = tl.sum(acc, axis=1)                                                                  # [BM, BN]
    if ONE_GROUP:
        s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        z = tl.load(z_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        y = (y * LEVELS - (z + LEVELS) * tl.sum(x_acc, axis=1)) * s
    let_next_start(PDL)
    _store_out(out_ptr, part_ptr, count_ptr, y, offs_m, offs_n, M, N, stride_om, num_splits, SPLIT)


# One int32 word of eight 4-bit codes against eight bf16 activations, in packed bf16x2 arithmetic (sm_80+),
# split in two so that rows of x share one dequantization. _BF16X2_DEQUANT8: a code ORed into the mantissa of
# bf16 128.0 is 128 + code exactly, so one LOP3 makes two (the word's nibbles i and i + 4 land in the two halves,
# hence x pairs up as (x_i, x_{i+4})), and one FMA with -(128 + zero) leaves code - zero exactly.
# $0..$3 out: (c_i - z, c_{i+4} - z) as bf16x2 for i = 0..3; $4 the word; $5 -(128 + zero) as fp32, whose top
# half is that value in bf16 (exact): one PRMT copies it into both halves.
_BF16X2_DEQUANT8 = tl.constexpr("""{
.reg .b32 t0, t1, t2, one, nz;
mov.b32 one, 0x3F803F80;
prmt.b32 nz, $5, 0, 0x3232;
shr.u32 t0, $4, 4;
shr.u32 t1, $4, 8;
shr.u32 t2, $4, 12;
lop3.b32 $0, $4, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 $1, t0, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 $2, t1, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 $3, t2, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 $0, $0, one, nz;
fma.rn.bf16x2 $1, $1, one, nz;
fma.rn.bf16x2 $2, $2, one, nz;
fma.rn.bf16x2 $3, $3, one, nz;
}""")
# _BF16X2_DOT8: four packed FMAs take the word's dot product with one row of x, two codes per instruction, and
# the two halves meet in fp32. $0 out (fp32); $1..$4 the dequantized pairs; $5..$8 the x pairs as bf16x2.
_BF16X2_DOT8 = tl.constexpr("""{
.reg .b32 nzero, a, lo, hi;
.reg .f32 f0, f1;
mov.b32 nzero, 0x80008000;
fma.rn.bf16x2 a, $1, $5, nzero;
fma.rn.bf16x2 a, $2, $6, a;
fma.rn.bf16x2 a, $3, $7, a;
fma.rn.bf16x2 a, $4, $8, a;
shl.b32 lo, a, 16;
and.b32 hi, a, 0xFFFF0000;
mov.b32 f0, lo;
mov.b32 f1, hi;
add.f32 $0, f0, f1;
}""")


@triton.jit
def _bf16x2_codes(words, z):
    """``_BF16X2_DEQUANT8`` of ``words`` for fp32 zeros ``z``: four int32 tensors of ``(c_i - z, c_{i+4} - z)``
    as bf16x2. ``-(128 + zero)`` is exact in bf16, so its bits are the top half of its fp32."""
    nz = (-128.0 - z).to(tl.int32, bitcast=True)
    return tl.inline_asm_elementwise(_BF16X2_DEQUANT8, "=r,=r,=r,=r,r,r", [words, nz],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _bf16_pair(lo, hi):
    """Two bf16 or fp16 tensors -> one int32 tensor of bf16x2 (``lo`` in the low half); fp16 rounds to bf16."""
    lo = lo.to(tl.bfloat16).to(tl.int16, bitcast=True)
    hi = hi.to(tl.bfloat16).to(tl.int16, bitcast=True)
    return (lo.to(tl.int32) & 0xFFFF) | (hi.to(tl.int32) << 16)


@triton.jit(do_not_specialize=["tiles_per_split", "num_splits"])
def _wo_gemv_bf16x2_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_om,
                           tiles_per_split, num_splits, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr, ROWWISE: tl.constexpr, SPLIT: tl.constexpr,
                           PREFETCH: tl.constexpr, PDL: tl.constexpr):
    """The 4-bit ``gemv`` in packed bf16x2 math, for bf16 activations (fp16 ones round to bf16 as they load:
    2**-9 relative, the size of the chains' own rounding).

    ``PREFETCH`` loads the next tile's words into registers before this tile's math, so a program keeps a tile
    in flight while it computes (``ptxas`` still places the load mid-loop, not at its top). Through shared
    memory instead (``tl.range(..., num_stages=3)``, ``cp.async``) it was slower: 68.3 µs per Llama-2-7B layer
    at best against 62.4 without and 59.4 with this (H100 dev sweeps).
    """
    PACK: tl.constexpr = 8
    pid_k = tl.program_id(2)
    offs_m, offs_n, m3, n3, n_mask = _gemv_tile(M, N, BLOCK_M, BLOCK_N)
    KPT = K // PACK
    acc = tl.zeros((BLOCK_M, BLOCK_KP, BLOCK_N), dtype=tl.float32)
    nxt = _first_words(qw_ptr, pid_k * tiles_per_split * BLOCK_KP, KPT, N, n3, n_mask, BLOCK_KP, PREFETCH)
    wait_for_inputs(PDL)  # weights are never written by a decode kernel: only x, the partials and counters wait
    for t in range(tiles_per_split):
        kp0, rows, words, nxt = _tile_words(qw_ptr, nxt, pid_k, t, tiles_per_split, KPT, N, n3, n_mask, BLOCK_KP,
                                            PREFETCH)                                    # words [1, BKP, BN]
        r_mask = rows < KPT
        s, z = _group_affine(s_ptr, z_ptr, kp0, rows, n3, n_mask, N, KPT, GROUP, PACK, ROWWISE, True)
        x_rows = x_ptr + m3 * stride_xm + rows * PACK
        x_mask = (m3 < M) & r_mask
        x01 = _bf16_pair(tl.load(x_rows, mask=x_mask, other=0.0), tl.load(x_rows + 4, mask=x_mask, other=0.0))
        x23 = _bf16_pair(tl.load(x_rows + 1, mask=x_mask, other=0.0), tl.load(x_rows + 5, mask=x_mask, other=0.0))
        x45 = _bf16_pair(tl.load(x_rows + 2, mask=x_mask, other=0.0), tl.load(x_rows + 6, mask=x_mask, other=0.0))
        x67 = _bf16_pair(tl.load(x_rows + 3, mask=x_mask, other=0.0), tl.load(x_rows + 7, mask=x_mask, other=0.0))
        w0, w1, w2, w3 = _bf16x2_codes(words, z)                                             # [1, BKP, BN]
        part = tl.inline_asm_elementwise(_BF16X2_DOT8, "=f,r,r,r,r,r,r,r,r", [w0, w1, w2, w3, x01, x23, x45, x67],
                                         dtype=tl.float32, is_pure=True, pack=1)            # [BM, BKP, BN]
        acc += part * s
    let_next_start(PDL)
    _store_out(out_ptr, part_ptr, count_ptr, tl.sum(acc, axis=1), offs_m, offs_n, M, N, stride_om, num_splits, SPLIT)


@triton.jit
def _dot_pair(x_rows, x_mask, i: tl.constexpr, pairs, part, SWAP: tl.constexpr):
    """``part += x_i @ (c_i - z) + x_{i+4} @ (c_{i+4} - z)`` from bf16x2 ``pairs`` (halves split by moves); under
    ``SWAP`` the transposed product (``pairs`` and ``part`` are ``[BN, ..]``, the x tiles ``[BKP, BM]``)."""
    lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [pairs],
                                       dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
    x_lo = tl.load(x_rows + i, mask=x_mask, other=0.0).to(tl.bfloat16)  # fp16 x rounds to bf16, as in the gemv
    x_hi = tl.load(x_rows + i + 4, mask=x_mask, other=0.0).to(tl.bfloat16)
    if SWAP:  # (an early return here would still compile the line after it)
        part = tl.dot(hi, x_hi, tl.dot(lo, x_lo, part))
    else:
        part = tl.dot(x_hi, hi, tl.dot(x_lo, lo, part))
    return part


@triton.jit
def _bf16x2_dots(words, z, x_rows, x_mask, part, SWAP: tl.constexpr):
    """``part`` plus a one-group tile's product, its codes from ``_BF16X2_DEQUANT8`` (``_dot_pair`` per pair)."""
    w0, w1, w2, w3 = _bf16x2_codes(words, z)
    part = _dot_pair(x_rows, x_mask, 0, w0, part, SWAP)
    part = _dot_pair(x_rows, x_mask, 1, w1, part, SWAP)
    part = _dot_pair(x_rows, x_mask, 2, w2, part, SWAP)
    return _dot_pair(x_rows, x_mask, 3, w3, part, SWAP)


@triton.jit(do_not_specialize=["tiles_per_split", "num_splits"])
def _wo_dot_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_om,
                   tiles_per_split, num_splits, GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr, ROWWISE: tl.constexpr, SPLIT: tl.constexpr,
                   PRECISION: tl.constexpr, BF16X2: tl.constexpr, PDL: tl.constexpr):
    """``BF16X2`` (4-bit codes, bf16 or fp16 x, one group per tile, CUDA): the codes are dequantized two per
    instruction by ``_BF16X2_DEQUANT8`` and split into the eight ``code_j - zero`` tiles by register moves."""
    PACK: tl.constexpr = 32 // BITS
    wait_for_inputs(PDL)
    offs_m, offs_n, m_mask, n_mask = _dot_tile(M, N, BLOCK_M, BLOCK_N)
    KPT = K // PACK
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(tiles_per_split):
        kp0, rows, r_mask = _k_rows(t, tiles_per_split, KPT, BLOCK_KP)
        words = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0)
        s, z = _group_affine(s_ptr, z_ptr, kp0, rows[:, None], offs_n[None, :], n_mask[None, :], N, KPT, GROUP, PACK,
                             ROWWISE, False)
        zm = z + 8388608.0  # zero + 2**23, for _code_minus_zero
        x_rows = x_ptr + offs_m[:, None] * stride_xm + rows[None, :] * PACK
        x_mask = m_mask[:, None] & r_mask[None, :]
        if ROWWISE:  # scales differ along the tile's K: apply them before the dot (what the reference rounds)
            for j in tl.static_range(PACK):
                w = _code_minus_zero(words, j, zm, BITS)
                xj = tl.load(x_rows + j, mask=x_mask, other=0.0)
                acc = tl.dot(xj, (w * s).to(xj.dtype), acc, input_precision=PRECISION)
        elif BF16X2:  # one group, bf16: the same exact (code - zero), from packed PTX
            part = _bf16x2_dots(words, z, x_rows, x_mask, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), False)
            acc += part * s
        else:        # one group: dot on exact (code - zero), scale once after
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(PACK):
                w = _code_minus_zero(words, j, zm, BITS)
                xj = tl.load(x_rows + j, mask=x_mask, other=0.0)
                part = tl.dot(xj, w.to(xj.dtype), part, input_precision=PRECISION)
            acc += part * s
    let_next_start(PDL)
    _store_out(out_ptr, part_ptr, count_ptr, acc, offs_m, offs_n, M, N, stride_om, num_splits, SPLIT)


@triton.jit(do_not_specialize=["tiles_per_split", "num_splits"])
def _wo_dot_t_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_om,
                     tiles_per_split, num_splits, GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                     BF16X2: tl.constexpr, PDL: tl.constexpr):
    """The one-group ``dot`` with its operands swapped: ``out^T[BN, BM] = (c - z)^T[BN, BKP] @ x^T[BKP, BM]``.

    Why: at a few rows of x the dequantized weight is the big operand. As the first one, a ``BLOCK_N`` of 64+
    fills Hopper's wgmma M (64 per warp group) and can stay in registers, where as the second it passes through
    shared memory into an Ampere-style MMA padded to ``BLOCK_M`` = 16 rows (numbers: the ``CONFIGS`` comment).
    The words load as ``[BN, BKP]`` (still coalesced along N); tiles spanning groups take the ``dot``.
    """
    PACK: tl.constexpr = 32 // BITS
    wait_for_inputs(PDL)
    offs_m, offs_n, m_mask, n_mask = _dot_tile(M, N, BLOCK_M, BLOCK_N)
    KPT = K // PACK
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in range(tiles_per_split):
        kp0, rows, r_mask = _k_rows(t, tiles_per_split, KPT, BLOCK_KP)
        words = tl.load(qw_ptr + rows[None, :] * N + offs_n[:, None], mask=r_mask[None, :] & n_mask[:, None], other=0)
        s, z = _group_affine(s_ptr, z_ptr, kp0, rows[None, :], offs_n[:, None], n_mask[:, None], N, KPT, GROUP, PACK,
                             False, False)                                                   # [BN, 1]
        x_rows = x_ptr + offs_m[None, :] * stride_xm + rows[:, None] * PACK                  # [BKP, BM]
        x_mask = m_mask[None, :] & r_mask[:, None]
        part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        if BF16X2:
            part = _bf16x2_dots(words, z, x_rows, x_mask, part, True)
        else:
            zm = z + 8388608.0  # zero + 2**23, for _code_minus_zero
            for j in tl.static_range(PACK):
                xj = tl.load(x_rows + j, mask=x_mask, other=0.0)
                part = tl.dot(_code_minus_zero(words, j, zm, BITS).to(xj.dtype), xj, part, input_precision=PRECISION)
        acc += part * s
    let_next_start(PDL)
    _store_out(out_ptr, part_ptr, count_ptr, tl.trans(acc), offs_m, offs_n, M, N, stride_om, num_splits, SPLIT)


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, GROUP: tl.constexpr, BITS: tl.constexpr,
                    BLOCK_KP: tl.constexpr, BLOCK_N: tl.constexpr, ROWWISE: tl.constexpr):
    PACK: tl.constexpr = 32 // BITS
    kp0 = tl.program_id(0) * BLOCK_KP
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = kp0 + tl.arange(0, BLOCK_KP)
    KPT = K // PACK
    n_mask = offs_n < N
    mask = (rows < KPT)[:, None] & n_mask[None, :]
    words = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0)
    s, z = _group_affine(s_ptr, z_ptr, kp0, rows[:, None], offs_n[None, :], n_mask[None, :], N, KPT, GROUP, PACK,
                         ROWWISE, True)
    zm = z + 8388608.0  # zero + 2**23, for _code_minus_zero
    for j in tl.static_range(PACK):
        w = _code_minus_zero(words, j, zm, BITS) * s
        tl.store(out_ptr + (rows[:, None] * PACK + j) * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# ---- launch ------------------------------------------------------------------------------------------------

def _check(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int) -> tuple[int, int]:
    if bits not in (4, 8):
        raise BadInputError(f"bits must be 4 or 8, got {bits}")
    K, N = qweight.shape[0] * (32 // bits), qweight.shape[1]
    G = (K + group_size - 1) // group_size
    if qweight.dtype != torch.int32 or tuple(scales.shape) != (G, N) or tuple(zeros.shape) != (G, N):
        raise BadInputError(f"bad packed weight: qweight {qweight.dtype} {tuple(qweight.shape)}, scales "
                            f"{tuple(scales.shape)}, zeros {tuple(zeros.shape)} for K={K}, N={N}, group {group_size}")
    return K, N


def _rowwise(group_size: int, K: int, bits: int, block_kp: int) -> bool:
    """Whether a tile of ``block_kp`` word rows spans several groups (then scales load per word row)."""
    pack = 32 // bits
    if group_size >= K or group_size % (block_kp * pack) == 0:
        return False
    if group_size % pack:
        raise BadInputError(f"group size {group_size} is not a multiple of {pack}: a {bits}-bit word would straddle "
                            "two groups; requantize with group size 32, 64 or 128")
    return True


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def split_k_count(waves: float, grid_mn: int, k_tiles: int, device: torch.device) -> int:
    """How many programs share one output tile's K range: ``waves`` programs per SM in all (0: no split), at most
    one per K tile, and no empty split."""
    if waves <= 0:
        return 1
    split = max(1, min(k_tiles, round(waves * _sm_count(device) / max(grid_mn, 1))))
    return triton.cdiv(k_tiles, triton.cdiv(k_tiles, split))



def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triton dequantization to ``[K, N]`` in ``dtype`` (bit-exact with ``dequantize_reference`` in fp32)."""
    K, N = _check(qweight, scales, zeros, bits, group_size)
    out = torch.empty(K, N, dtype=dtype, device=qweight.device)
    bkp, bn = 16, 64
    grid = (triton.cdiv(K // (32 // bits), bkp), triton.cdiv(N, bn))
    _dequant_kernel[grid](qweight, scales, zeros, out, N, K, GROUP=group_size, BITS=bits, BLOCK_KP=bkp, BLOCK_N=bn,
                          ROWWISE=_rowwise(group_size, K, bits, bkp))
    return out


@functools.cache
def dequant_min_rows(bits: int, group_size: int, K: int) -> int:
    """Rows from which ``wo_matmul`` on CUDA dequantizes the weight and calls cuBLAS: later where the kernel below
    is ``dot_t``, which stays ahead up to 64 rows, than where tiles span groups and the slower ``dot`` runs.
    Cached, since every eager call asks: code that swaps ``CONFIGS`` at run time must ``cache_clear()`` it."""
    below = pick_config(DEQUANT_GEMM_MIN_M - 1, bits)
    runs_dot = below.kernel != "dot_t" or _rowwise(group_size, K, bits, below.block_kp)
    return DEQUANT_GEMM_MIN_M_ROWWISE if runs_dot else DEQUANT_GEMM_MIN_M


def dequant_scratch_bytes(weight_shapes: list[tuple[int, int, int]], rows: int, elem_bytes: int = 2) -> int:
    """The scratch weight ``wo_matmul`` allocates on CUDA for a ``rows``-row input: the largest ``K x N`` of the
    ``(K, N, dequant_min_rows)`` in ``weight_shapes`` that ``rows`` reaches, dequantized. Memory start-up and the
    planner must set it aside, since a decode graph captured at that many rows keeps it in its pool."""
    return max((k * n for k, n, min_rows in weight_shapes if rows >= min_rows), default=0) * elem_bytes


BF16X2_MIN_CAPABILITY = (8, 0)  # fma.rn.bf16x2 (Ampere: the RTX 3090; the 4090 and H100 are later)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def packed_bf16_ok(bits: int, x: torch.Tensor) -> bool:
    """Whether the packed bf16x2 PTX can run for ``x``: 4-bit codes, bf16 or fp16 ``x`` (rounded to bf16 as it
    loads) on a CUDA GPU with bf16x2 FMA. Elsewhere (the CPU interpreter, fp32 ``x``, 8-bit, pre-Ampere GPUs) the
    fp32 paths run the same tiles."""
    return (bits == 4 and x.dtype in (torch.bfloat16, torch.float16) and x.is_cuda
            and _capability(x.device) >= BF16X2_MIN_CAPABILITY)


def kernel_for(config: KernelConfig, bits: int, x: torch.Tensor, rowwise: bool = False) -> str:
    """The kernel ``config`` runs for ``x``: ``gemv_bf16x2`` becomes the fp32 ``gemv`` where ``packed_bf16_ok``
    says no, and ``dot_t`` the ``dot`` where its tiles span several groups (``rowwise``)."""
    if config.kernel == "gemv_bf16x2" and not packed_bf16_ok(bits, x):
        return "gemv"
    if config.kernel == "dot_t" and rowwise:
        return "dot"
    return config.kernel


def dequant_gemm(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 group_size: int) -> torch.Tensor:
    """``wo_matmul``'s path from ``dequant_min_rows`` rows on CUDA: the weight dequantized to x's dtype, then
    cuBLAS."""
    return x2 @ dequantize(qweight, scales, zeros, bits, group_size, dtype=x2.dtype)


def wo_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
              group_size: int, config: KernelConfig | None = None) -> torch.Tensor:
    """``x[..., K] @ dequant(W)[K, N]`` -> ``[..., N]`` in x's dtype.

    ``config`` overrides the table (benchmarks, tests); without it, long
    prefills on CUDA take the dequantize + cuBLAS path, and int4 g128 at 2-64
    rows and int8 per-channel at 1-32 rows of bf16 x on an Ampere-or-later GPU
    the tensor-core kernel of ``kernels.wo_mma``.
    """
    K, N = _check(qweight, scales, zeros, bits, group_size)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if config is None:
        if x.is_cuda and M >= dequant_min_rows(bits, group_size, K):
            return dequant_gemm(x2, qweight, scales, zeros, bits, group_size).reshape(*lead, N)
        if x.is_cuda:
            from onecard.kernels import wo_mma  # imports this module

            # None where it does not apply, or (warned once) where this Triton cannot build it
            y = wo_mma.wo_mma(x2, qweight, scales, zeros, bits) if wo_mma.pick(x2, bits, group_size, N) else None
            if y is not None:
                return y.reshape(*lead, N)
        config = pick_config(M, bits)
    c = config
    k_tiles = triton.cdiv(K // (32 // bits), c.block_kp)
    grid_m, grid_n = triton.cdiv(M, c.block_m), triton.cdiv(N, c.block_n)
    split = split_k_count(c.waves, grid_m * grid_n, k_tiles, x.device)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    # fp32 partials only under split-K; otherwise the kernel never touches part_ptr, so ``out`` stands in
    part = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else out
    consts = {"GROUP": group_size, "BITS": bits, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_KP": c.block_kp,
              "ROWWISE": _rowwise(group_size, K, bits, c.block_kp), "SPLIT": split > 1}
    kind = kernel_for(c, bits, x, consts["ROWWISE"])
    if kind in ("dot", "dot_t"):
        consts["PRECISION"] = "ieee" if x.dtype == torch.float32 else "tf32"
        consts["BF16X2"] = packed_bf16_ok(bits, x) and not consts["ROWWISE"]
        kernel = _wo_dot_kernel
        if kind == "dot_t":
            kernel = _wo_dot_t_kernel
            del consts["ROWWISE"]
    elif kind == "gemv_bf16x2":
        kernel = _wo_gemv_bf16x2_kernel
        del consts["BITS"]
        consts["PREFETCH"] = c.prefetch
    else:
        kernel = _wo_gemv_kernel
        consts.update(PREFETCH=c.prefetch, ONE_GROUP=group_size >= K)
    if x.is_cuda:
        consts.update(num_warps=c.num_warps, num_stages=c.num_stages)
    consts.update(pdl_launch(x) if c.pdl else {"PDL": False})
    counters = zeroed_counters(x.device, grid_m * grid_n, "wo_matmul")
    kernel[(grid_m, grid_n, split)](x2, qweight, scales, zeros, out, part, counters, M, N, K, x2.stride(0), N,
                                    triton.cdiv(k_tiles, split), split, **consts)
    return out.reshape(*lead, N)
