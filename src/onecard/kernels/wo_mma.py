"""Weight-only matmul on tensor cores, in Gluon: ``out[M, N] = x[M, K] @ W[K, N]`` for int4 g128 codes at 2-64
rows of x and int8 per-channel codes at 1-32 rows.

Why a second kernel beside ``wo_matmul``'s: at a few rows of x its Triton ``dot_t`` streams the words at well
under half the card's bandwidth. Triton decides where values live, and it sends every dequantized bf16 tile
through shared memory before its ``tl.dot``; Gluon (``triton.experimental.gluon``) lets this kernel place them.
Marlin's design, on the GPTQ words as stored (no pre-shuffled copy):

- each 128-wide K block's words (``[16, BN]`` int4, ``[32, BN]`` int8) and x tile ``[BM, 128]`` arrive by
  ``cp.async`` in a ``STAGES``-deep shared-memory ring, so several blocks' bytes are in flight while one is
  computed;
- on Ampere's ``mma.sync`` (m16n8k16) as ``out^T = W^T x^T``, a lane ``(g, t)`` that loads the word ``(4 c + t,
  n)`` with ``n % 8 = g`` holds, once dequantized in registers, exactly its A fragment of K chunk ``c`` in a
  permuted K order (a sum over K does not care), and its B fragment is x's consecutive values at the same
  physical K (one 16- or 8-byte load). Both operands go from shared memory to registers once and into the mma
  with no round trip.
- int4: the packed bf16x2 PTX of ``wo_matmul`` (nibbles ``i`` and ``i + 4`` in one register); a 32-wide chunk's
  logical K ``32 c + 16 b + 8 h + 2 t + e`` is physical ``32 c + 8 t + 4 e + 2 b + h``. Scale and zero per group
  (= per block).
- int8: the magic-number trick needs ``2**k + code`` exact, which bf16's 8 significant bits cannot hold for
  8-bit codes and fp16's 11 can. One PRMT puts two code bytes under fp16 1024.0's high byte (``1024 + c``, exact), one packed add of ``-(1024 + z)``
  leaves ``c - z`` exactly; x goes to fp16 scaled by 2**-8 (no product nears fp16's 65504; exact down to
  ``|x| ~ 2**-9``, and below that only bits far under the bf16 output's rounding are lost), and the 2**8 folds
  into the per-channel scale after the loop. A 16-wide chunk's logical K ``8 q + 2 t + s`` is physical
  ``4 t + 2 q + s``.

Measured (``benchmarks/quant_kernels.py``, ``docs/results/quant_kernels.json``, one H200, a Llama-2-7B layer's four
linears, graph-timed with L2 flushed): int4 at 2 / 4 / 8 / 16 / 32 rows 67.7 / 67.7 / 70.1 / 86.6 / 111.0 µs
against the Triton kernels' 80.7 / 95.4 / 110.1 / 115.8 / 169.0 and bf16 cuBLAS's ~135-140. 64 int4 rows in one
launch were no faster than ``dot_t`` (dev: 273.0 against 268.3 µs), so 33-64 rows run as two launches of up to 32
(224.7 against 267.7 at 64). int8 (dev probe ``.device/w8mma.py``, one H200, best tile and split per linear, the
output memset subtracted): 78.1 / 82.3 / 84.5 / 98.3 / 152.6 µs at 1 / 2 / 8 / 16 / 32 rows against the Triton
kernels' 94.4 / 117.4 / 127.0 / 128.5 / 170.1 (at 1 row its GEMV). Two int8 launches of 32 rows would read more
than ``dot_t``'s one at 64, so int8 stops at 32. Split-K as ``wo_matmul``'s kernels do it: the last split of a
tile sums the fp32 partials and writes the output, no memset or cast.

It needs CUDA compute capability 8.0+, bf16 x, ``N`` a multiple of the tile and ``K`` of 128; the Triton kernels
run everywhere else, and on CPU (Gluon has no interpreter, so this kernel is tested on the GPU only).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import triton

from onecard.kernels.counters import zeroed_counters
from onecard.kernels.launch import use_pdl
from onecard.kernels.wo_matmul import _BF16X2_DEQUANT8, split_k_count

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.errors import TritonError  # CompilationError, PTXASError, OutOfResources

    # renamed in Triton 3.7+, where the old name raises
    _async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared
    _barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # renamed in 3.7+ as well
    # the layouts ``layouts`` builds: a Gluon without them goes to the except below, not to a failure at first call
    _LAYOUTS = (gl.DistributedLinearLayout, gl.NVMMADistributedLayout, gl.SwizzledSharedLayout)
except (ImportError, AttributeError):  # pragma: no cover - Triton without this much of Gluon
    gluon = None

MIN_CAPABILITY = (8, 0)  # cp.async and bf16 mma.sync
BLOCK_K = 128            # K a pipeline stage holds: one int4 group's 16 int32 words, or 32 words of int8
_unusable: str | None = None  # why this Triton could not build the kernel (Gluon is experimental), once it failed
_enabled = True


def set_enabled(on: bool) -> None:
    """Use the kernel where it applies (the default) or never: the A/B arm of ``benchmarks/quant_decode.py``.
    Engines read it when they capture their graphs, so set it before building one."""
    global _enabled
    _enabled = on


@dataclass(frozen=True)
class MmaConfig:
    """One launch shape: ``block_m`` rows of x (the mma's N, >= 8), ``block_n`` output columns, ``stages`` K
    blocks in the ring; split-K from ``waves`` programs per SM, as ``KernelConfig.waves``."""

    block_m: int
    block_n: int
    num_warps: int
    stages: int
    waves: float


# bits -> (largest M of the bucket) -> config. int4: dev sweep .device/w4mma2.py (one H200, 5 tiles x up to 7
# splits, per linear of a Llama-2-7B layer): BN 64 with 4 warps and 4 stages was best or within a few per cent at 8
# and 16 rows, and at 32 rows on three of the four linears. int8: dev probe .device/w8mma.py (same layer, 4 tiles x
# up to 7 splits): BN 64 with 4 warps best everywhere but the 22016-wide linear at 32 rows, 3 or 4 stages within
# 2 %, and the best splits near three programs per SM.
CONFIGS: dict[int, dict[int, MmaConfig]] = {
    4: {8: MmaConfig(8, 64, 4, 4, 6.0), 16: MmaConfig(16, 64, 4, 4, 6.0), 32: MmaConfig(32, 64, 4, 4, 3.0)},
    8: {8: MmaConfig(8, 64, 4, 4, 3.0), 16: MmaConfig(16, 64, 4, 3, 3.0), 32: MmaConfig(32, 64, 4, 4, 3.0)},
}
# One int4 row keeps the packed GEMV (wo_matmul): an engine A/B (dev .device/mma_m1_ab.py, one H200, int4
# Llama-2-7B, two alternating rounds) gave bs=1 1.668-1.777 ms/token with it against 1.801-1.804 with this kernel,
# and bs=2 2.171-2.268 ms/step against 1.901-1.906; again with the words loaded before the PDL wait (dev
# .device/prologue_ab.py, one round): 2.236 against 2.365. int8's GEMV is slower than this kernel at one row.
MIN_ROWS = {4: 2, 8: 1}
ROWS_PER_LAUNCH = 32
# int4: 33-64 rows run as two launches of up to 32, each reading every weight: still less than dot_t's one launch
# there (quant_kernels.py); from 65 rows the dequantize + cuBLAS path (wo_matmul.DEQUANT_GEMM_MIN_M) reads less.
MAX_ROWS = {4: 2 * ROWS_PER_LAUNCH, 8: ROWS_PER_LAUNCH}


def takes_codes(bits: int, group_size: int, K: int) -> bool:
    """The formats this kernel reads: int4 in groups of 128, int8 per channel (one group spans K)."""
    return K % BLOCK_K == 0 and ((bits == 4 and group_size == BLOCK_K) or (bits == 8 and group_size >= K))


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _bucket(bits: int, rows: int) -> MmaConfig:
    table = CONFIGS[bits]
    return table[min(m for m in table if m >= rows)]


def pick(x2: torch.Tensor, bits: int, group_size: int, N: int) -> MmaConfig | None:
    """The config of ``x2 [M, K]``'s first launch if this kernel can and should run it, else None (``wo_matmul``'s
    kernels)."""
    M, K = x2.shape
    if gluon is None or _unusable or not _enabled or not takes_codes(bits, group_size, K):
        return None
    if not MIN_ROWS[bits] <= M <= MAX_ROWS[bits]:
        return None
    if not x2.is_cuda or x2.dtype != torch.bfloat16 or _capability(x2.device) < MIN_CAPABILITY:
        return None
    if x2.stride(0) % 16 or x2.data_ptr() % 16:  # 16-byte cp.async of x's rows: Triton proves their alignment
        return None                              # from a pointer and row stride divisible by 16
    if any(N % c.block_n for c in CONFIGS[bits].values()):
        return None
    return _bucket(bits, min(M, ROWS_PER_LAUNCH))


def _log2(v: int) -> int:
    return int(math.log2(v))


@functools.cache
def layouts(BN: int, BM: int, W: int, bits: int) -> dict:
    """Register layouts (mma lanes), copy layouts and shared layouts of one tile shape."""
    warp = [[16 << i, 0] for i in range(_log2(W))]
    # a chunk's words [BN, 4]: lane (g, t) holds (n = g + 8 r + 16 w + ..., word t)
    lw = gl.DistributedLinearLayout([[8, 0]] + [[16 * W << i, 0] for i in range(_log2(BN // (16 * W)))],
                                    [[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]], warp, [], [BN, 4])
    # a chunk's x [BM, 4 v] (v = 32 // bits codes a word): lane (g, t) holds (m = g + 8 r, k = v t + j); every warp
    # holds the whole chunk
    v = 32 // bits
    regs = [[0, 1 << i] for i in range(_log2(v))] + [[8 << i, 0] for i in range(_log2(BM // 8))]
    lx = gl.DistributedLinearLayout(regs, [[0, v], [0, 2 * v], [1, 0], [2, 0], [4, 0]], [[0, 0]] * _log2(W), [],
                                    [BM, 4 * v])
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1], instr_shape=[16, 8])
    tn = min(32, BN // 4)
    return dict(
        LW=lw, LX=lx, MMA=mma, A_L=gl.DotOperandLayout(0, mma, 2), B_L=gl.DotOperandLayout(1, mma, 2),
        CW=gl.BlockedLayout([1, 4], [32 // tn, tn], [W, 1], [1, 0]),  # words [WR, BN], 16 bytes a thread
        CX=gl.BlockedLayout([1, 8], [2, 16], [W, 1], [1, 0]),          # x [BM, 128], 16 bytes a thread
        SW=gl.SwizzledSharedLayout(8, 1, 4, [1, 0]),                  # a warp's four word rows on distinct banks
        SX=gl.SwizzledSharedLayout(8, 1, 8, [1, 0]),
    )


if gluon is not None:
    _DEQUANT8 = gl.constexpr(_BF16X2_DEQUANT8.value)
    # two int8 codes -> fp16x2 (c - z): $0 codes 0-1, $1 codes 2-3 of the word $2; $3 -(1024 + z) as fp16x2
    _FP16X2_DEQUANT_U8 = gl.constexpr("""{
.reg .b32 magic;
mov.b32 magic, 0x64646464;
prmt.b32 $0, $2, magic, 0x4140;
prmt.b32 $1, $2, magic, 0x4342;
add.rn.f16x2 $0, $0, $3;
add.rn.f16x2 $1, $1, $3;
}""")

    @gluon.jit
    def _gdc_wait():
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _gdc_launch_dependents():
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _pair(v, dtype: gl.constexpr):
        """The two 16-bit halves of ``v`` as ``dtype``, low first."""
        lo, hi = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [v], dtype=(gl.int16, gl.int16),
                                           is_pure=True, pack=1)
        return lo.to(dtype, bitcast=True), hi.to(dtype, bitcast=True)

    @gluon.jit
    def _load_words(w_smem, qw_ptr, w_off, N, blk, ok, slot, WR: gl.constexpr):
        """cp.async K block ``blk``'s words into ring slot ``slot`` (zero-filled where ``ok`` is false); the caller
        commits the group."""
        _async_load(w_smem.index(slot), qw_ptr + blk * WR * N + w_off, mask=ok & (w_off >= 0))

    @gluon.jit
    def _load_x(x_smem, x_ptr, x_off, x_mask, blk, ok, slot):
        """cp.async K block ``blk``'s x tile into ring slot ``slot``, as ``_load_words``."""
        _async_load(x_smem.index(slot), x_ptr + blk * 128 + x_off, mask=ok & x_mask)

    @gluon.jit
    def _block_product4(w_slot, x_slot, z, BN: gl.constexpr, BM: gl.constexpr, LW: gl.constexpr,
                        LX: gl.constexpr, MMA: gl.constexpr, A_L: gl.constexpr, B_L: gl.constexpr):
        """``(codes - z)^T x^T`` of one int4 group, ``[BN, BM]`` fp32, in four 32-wide K chunks."""
        wv = w_slot.permute([1, 0])
        nz = gl.expand_dims((-128.0 - z).to(gl.int32, bitcast=True), 1) + gl.zeros([BN, 4], gl.int32, LW)
        part = gl.zeros([BN, BM], gl.float32, MMA)
        for c in gl.static_range(4):
            words = wv.slice(4 * c, 4, dim=1).load(LW)
            r0, r1, r2, r3 = gl.inline_asm_elementwise(_DEQUANT8, "=r,=r,=r,=r,r,r", [words, nz],
                                                       dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True,
                                                       pack=1)
            l0, h0 = _pair(r0, gl.bfloat16)
            l1, h1 = _pair(r1, gl.bfloat16)
            l2, h2 = _pair(r2, gl.bfloat16)
            l3, h3 = _pair(r3, gl.bfloat16)
            a = gl.join(gl.join(gl.join(l0, h0), gl.join(l1, h1)), gl.join(gl.join(l2, h2), gl.join(l3, h3)))
            a = gl.permute(a, [0, 4, 3, 1, 2])                 # (n, t, e, h, b) -> (n, b, h, t, e)
            a = gl.convert_layout(gl.reshape(a, [BN, 32]), A_L, assert_trivial=True)
            xv = x_slot.slice(32 * c, 32, dim=1).load(LX)
            xv = gl.permute(gl.reshape(xv, [BM, 4, 2, 2, 2]), [3, 4, 1, 2, 0])  # (m, t, e, b, h) -> (b, h, t, e, m)
            b = gl.convert_layout(gl.reshape(xv, [32, BM]), B_L, assert_trivial=True)
            part = mma_v2(a, b, part)
        return part

    @gluon.jit
    def _block_product8(w_slot, x_slot, nz, acc, BN: gl.constexpr, BM: gl.constexpr, LW: gl.constexpr,
                        LX: gl.constexpr, A_L: gl.constexpr, B_L: gl.constexpr):
        """``acc + (codes - z)^T (x / 256)^T`` over one 128-wide K block of int8 codes, in eight 16-wide chunks."""
        wv = w_slot.permute([1, 0])
        for c in gl.static_range(8):
            words = wv.slice(4 * c, 4, dim=1).load(LW)
            r0, r1 = gl.inline_asm_elementwise(_FP16X2_DEQUANT_U8, "=r,=r,r,r", [words, nz],
                                               dtype=(gl.int32, gl.int32), is_pure=True, pack=1)
            l0, h0 = _pair(r0, gl.float16)
            l1, h1 = _pair(r1, gl.float16)
            a = gl.join(gl.join(l0, h0), gl.join(l1, h1))        # (n, t, s, q): join adds the last axis
            a = gl.permute(a, [0, 3, 1, 2])                       # (n, q, t, s): logical 8 q + 2 t + s
            a = gl.convert_layout(gl.reshape(a, [BN, 16]), A_L, assert_trivial=True)
            xv = (x_slot.slice(16 * c, 16, dim=1).load(LX).to(gl.float32) * 0.00390625).to(gl.float16)
            xv = gl.permute(gl.reshape(xv, [BM, 4, 2, 2]), [2, 1, 3, 0])  # (m, t, q, s) -> (q, t, s, m)
            b = gl.convert_layout(gl.reshape(xv, [16, BM]), B_L, assert_trivial=True)
            acc = mma_v2(a, b, acc)
        return acc

    @gluon.jit(do_not_specialize=["blocks_per_split", "num_splits"])
    def _wo_mma_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, part_ptr, count_ptr, M, N, K, stride_xm,
                       blocks_per_split, num_splits, BITS: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr,
                       STAGES: gl.constexpr, SPLIT: gl.constexpr, PDL: gl.constexpr, LW: gl.constexpr,
                       LX: gl.constexpr, MMA: gl.constexpr, A_L: gl.constexpr, B_L: gl.constexpr, CW: gl.constexpr,
                       CX: gl.constexpr, SW: gl.constexpr, SX: gl.constexpr):
        WR: gl.constexpr = 4 * BITS  # int32 word rows of a 128-wide K block
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        n0 = pid_n * BN
        w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, WR, BN], SW)
        x_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BM, 128], SX)
        ck = gl.arange(0, WR, layout=gl.SliceLayout(1, CW))
        cn = gl.arange(0, BN, layout=gl.SliceLayout(0, CW))
        w_off = gl.expand_dims(ck, 1) * N + gl.expand_dims(cn + n0, 0)
        xm = gl.arange(0, BM, layout=gl.SliceLayout(1, CX))
        xk = gl.arange(0, 128, layout=gl.SliceLayout(0, CX))
        x_off = gl.expand_dims(xm, 1) * stride_xm + gl.expand_dims(xk, 0)
        x_mask = (gl.expand_dims(xm, 1) < M) & (gl.expand_dims(xk, 0) >= 0)
        wn = gl.arange(0, BN, layout=gl.SliceLayout(1, LW)) + n0
        sn = gl.arange(0, BN, layout=gl.SliceLayout(1, MMA)) + n0
        b0 = pid_k * blocks_per_split
        count = gl.minimum(K // 128 - b0, blocks_per_split)
        # The ring's first blocks: words, scales and zeros before the PDL wait (no kernel of a decode step writes
        # them, so they load while the previous kernel finishes, as the GEMVs' first tile does), x after it. Each
        # load is its own cp.async group, words first: at block i < STAGES - 1 the loop's wait_group(STAGES - 2)
        # leaves pending only x tiles after x_i (or later blocks), so words_i and x_i have landed.
        for s in gl.static_range(STAGES - 1):
            _load_words(w_smem, qw_ptr, w_off, N, b0 + s, s < count, s, WR)
            cp.commit_group()
        if BITS == 4:  # a scale and zero per group (= K block), the next group's loaded a block ahead
            z = gl.load(z_ptr + b0 * N + wn).to(gl.float32)
            sc = gl.load(s_ptr + b0 * N + sn).to(gl.float32)
        else:  # per channel: -(1024 + z) as fp16x2, exact for integer zeros up to 1023
            zh = (-1024.0 - gl.load(z_ptr + wn).to(gl.float32)).to(gl.float16).to(gl.int16, bitcast=True)
            zh = zh.to(gl.int32) & 0xFFFF
            nz = gl.expand_dims(zh | (zh << 16), 1) + gl.zeros([BN, 4], gl.int32, LW)
            sc = gl.load(s_ptr + sn).to(gl.float32) * 256.0  # and the 2**8 x is scaled down by
        if PDL:
            _gdc_wait()
        for s in gl.static_range(STAGES - 1):
            _load_x(x_smem, x_ptr, x_off, x_mask, b0 + s, s < count, s)
            cp.commit_group()
        acc = gl.zeros([BN, BM], gl.float32, MMA)
        for i in range(count):
            blk = b0 + i
            if BITS == 4:
                z_next = gl.load(z_ptr + (blk + 1) * N + wn, mask=(i + 1 < count) & (wn >= 0),
                                 other=0.0).to(gl.float32)
                s_next = gl.load(s_ptr + (blk + 1) * N + sn, mask=(i + 1 < count) & (sn >= 0),
                                 other=0.0).to(gl.float32)
            cp.wait_group(STAGES - 2)
            _barrier()  # block i is in every thread's view; slot (i - 1) % STAGES is free
            nxt = blk + STAGES - 1  # into the slot block i - 1 freed, as one group
            _load_words(w_smem, qw_ptr, w_off, N, nxt, i + STAGES - 1 < count, (i + STAGES - 1) % STAGES, WR)
            _load_x(x_smem, x_ptr, x_off, x_mask, nxt, i + STAGES - 1 < count, (i + STAGES - 1) % STAGES)
            cp.commit_group()
            if BITS == 4:
                part = _block_product4(w_smem.index(i % STAGES), x_smem.index(i % STAGES), z, BN, BM, LW, LX, MMA,
                                       A_L, B_L)
                acc += part * gl.expand_dims(sc, 1)
                z = z_next
                sc = s_next
            else:
                acc = _block_product8(w_smem.index(i % STAGES), x_smem.index(i % STAGES), nz, acc, BN, BM, LW, LX,
                                      A_L, B_L)
        cp.wait_group(0)
        if BITS == 8:
            acc = acc * gl.expand_dims(sc, 1)
        if PDL:
            _gdc_launch_dependents()
        on = gl.arange(0, BN, layout=gl.SliceLayout(1, MMA)) + n0
        om = gl.arange(0, BM, layout=gl.SliceLayout(0, MMA))
        mn = gl.expand_dims(om, 0) * N + gl.expand_dims(on, 1)
        mask = (gl.expand_dims(om, 0) < M) & (gl.expand_dims(on, 1) >= 0)
        if SPLIT:  # as wo_matmul._store_out: the last split to finish sums the partials in split order
            gl.store(part_ptr + pid_k * M * N + mn, acc, mask=mask)
            _barrier()
            if gl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel") == num_splits - 1:
                total = gl.zeros([BN, BM], gl.float32, MMA)
                for k in range(num_splits):
                    total += gl.load(part_ptr + k * M * N + mn, mask=mask, other=0.0, cache_modifier=".cg")
                gl.store(out_ptr + mn, total.to(gl.bfloat16), mask=mask)
                gl.atomic_xchg(count_ptr + pid_n, 0)
        else:
            gl.store(out_ptr + mn, acc.to(gl.bfloat16), mask=mask)


def wo_mma(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
           config: MmaConfig | None = None, pdl: bool = True) -> torch.Tensor | None:
    """``x2 [M, K] (bf16) @ dequant(W)`` -> ``[M, N]`` bf16 for codes ``takes_codes`` accepts, in launches of up to
    ``ROWS_PER_LAUNCH`` rows, each with ``config`` or (None) its bucket's.

    None (with a warning, once) where this Triton's Gluon cannot build the kernel: its API is experimental and
    changes between releases, so the caller falls back to the Triton kernels rather than failing."""
    global _unusable
    M, K = x2.shape
    N = qweight.shape[1]
    blocks = K // BLOCK_K
    out = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    on = pdl and use_pdl(x2)
    for r0 in range(0, M, ROWS_PER_LAUNCH):
        rows = min(ROWS_PER_LAUNCH, M - r0)
        c = config or _bucket(bits, rows)
        grid_n = N // c.block_n
        split = split_k_count(c.waves, grid_n, blocks, x2.device)
        part = torch.empty(split, rows, N, dtype=torch.float32, device=x2.device) if split > 1 else out
        counters = zeroed_counters(x2.device, grid_n, "wo_mma")
        try:
            _wo_mma_kernel[(grid_n, split)](x2[r0:], qweight, scales, zeros, out[r0:], part, counters, rows, N, K,
                                            x2.stride(0), triton.cdiv(blocks, split), split, BITS=bits,
                                            BN=c.block_n, BM=c.block_m, STAGES=c.stages, SPLIT=split > 1, PDL=on,
                                            num_warps=c.num_warps, **({"launch_pdl": True} if on else {}),
                                            **layouts(c.block_n, c.block_m, c.num_warps, bits))
        except (TritonError, AttributeError, TypeError, RuntimeError) as e:  # compile-time, on the host
            _unusable = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            warnings.warn(f"onecard: the tensor-core weight-only kernel (kernels.wo_mma) does not build with Triton "
                          f"{triton.__version__} ({_unusable}); int4/int8 layers use the Triton kernels instead",
                          stacklevel=2)
            return None
    return out
