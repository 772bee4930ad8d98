"""Dense GEMV for decode (Triton): ``x[M, K] @ W[N, K].T`` at a few rows, where cuBLAS leaves bandwidth unused.

Why: a bs=1 decode step is the weights streamed once, so its speed is the
matmuls' bandwidth. Graph-timed on an H200 with L2 flushed
(``docs/results/quant_kernels.json``), cuBLAS's bf16 M=1 matmuls of a Llama-2-7B
layer stream 2.0 (4096x4096) to 3.4 TB/s (4096x22016), against 4.2 TB/s that a
device copy reaches: the layer's matmuls alone take ~140 µs where the bytes
need ~97 µs.

The kernel is the plain streaming form: each program owns ``BLOCK_N`` output
features and walks all of K, loading ``[BLOCK_N, BLOCK_K]`` tiles of W along
its contiguous K (16-byte vector loads), multiplying by the matching slice of
x (a few KB, L1-resident) into an fp32 ``[BLOCK_M, BLOCK_N, BLOCK_K]``
accumulator, and sums over K once at the end. The accumulator and both loads
are 3-D from the start, so the loop never changes layout. No split-K: with
``BLOCK_N`` of 2 rows even a 4096-wide output gives 2048 programs, many per
SM, all bandwidth-bound.

``CONFIGS`` and ``UNEVEN_K_CONFIGS`` (``benchmarks/kernel_gemv.py --sweep``
prints them for the card it runs on) set the blocks per M and K; above the
largest M (today 1: bs=1 decode) the layer calls cuBLAS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import nn
from torch.nn import functional as F

from onecard.errors import BadInputError
from onecard.kernels.launch import let_next_start, pdl_launch, wait_for_inputs
from onecard.kernels.swiglu import silu_mul, silu_times


MAX_PREFETCH = 2  # weight tiles _gemv_kernel can load before its PDL wait (3 or 4 gained nothing: UNEVEN_K_CONFIGS)


@dataclass(frozen=True)
class GemvConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    prefetch: int = 0  # weight tiles loaded before the PDL wait (see _gemv_kernel); fewer where K has fewer

    def __post_init__(self) -> None:
        if any(s < 1 or s & (s - 1) for s in (self.block_m, self.block_n, self.block_k)):
            raise BadInputError(f"bad gemv config {self}: block sizes must be powers of two")
        if self.prefetch not in range(MAX_PREFETCH + 1):
            raise BadInputError(f"bad gemv config {self}: prefetch is 0 to {MAX_PREFETCH} weight tiles")


# largest M of the bucket -> config; M above the last bucket goes to cuBLAS. From H200 runs
# (docs/results/kernel_gemv.json): at M = 1 a Llama-2-7B layer streams at 96% of the copy bandwidth vs cuBLAS's
# 80% (1.20x), a 13B layer at 99% (1.12x); at M = 2 the best config ties cuBLAS and at M = 4 loses (0.66x), so
# only M = 1 is here.
CONFIGS: dict[int, GemvConfig] = {
    1: GemvConfig(1, 2, 2048, 2),
}
# for K that is not a multiple of K_MULTIPLE, where a 2048-wide tile would overhang K and idle its masked lanes for
# a whole iteration (docs/results/kernel_gemv_sweep.json, chains of distinct weights: the uneven-K linears of the
# swept layers take 254.6 us with this tile vs 269.7 with CONFIGS'; K a multiple of 2048 prefers CONFIGS', 180.6 vs
# 186.2 us). Two tiles before the PDL wait, not one: a dev chain of 8 Llama-2-13B decode layers on one H200 (each
# GEMV behind a 6 us spin standing for the TP sum, or 2.5 us for a norm, and the fused attention) took 98.9 us a
# layer against 102.4 for the TP=2 shard and 162.8 against 167.1 at TP=1; 3 or 4 tiles gained nothing more. In
# one 2x H200 lease TP=2 bs=1 rose 234.0 -> 241.0 tok/s with it alone (TP=1 151.8 -> 153.4;
# dist_tp_before_in_buffer.json, dist_tp_prefetch2_only.json).
UNEVEN_K_CONFIGS: dict[int, GemvConfig] = {
    1: GemvConfig(1, 2, 1024, 4, prefetch=2),
}
K_MULTIPLE = 2048
GEMV_MAX_M = max(CONFIGS)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def pick_config(M: int, K: int | None = None, configs: dict[int, GemvConfig] = CONFIGS,
                uneven_k_configs: dict[int, GemvConfig] = UNEVEN_K_CONFIGS) -> GemvConfig:
    """The tuned config for ``M`` rows (and, given ``K``, for that K: see ``UNEVEN_K_CONFIGS``); the tables are
    the module's, or a sweep's candidates (``benchmarks/kernel_gemv.py``)."""
    if M > max(configs):
        raise BadInputError(f"gemv has tuned configs for up to {max(configs)} row(s), got {M}: pass config= or use "
                            "F.linear (cuBLAS is as fast from there on)")
    bucket = min(m for m in configs if m >= M)
    if K is not None and K % K_MULTIPLE and bucket in uneven_k_configs:
        return uneven_k_configs[bucket]
    return configs[bucket]


@triton.jit
def _tile_mask(ok, k3, k0, K, EVEN_K: tl.constexpr):
    """Where a ``[.., BK]`` tile at ``k0`` is in bounds (``ok``: its rows'). No K term where K is a multiple of the
    tile: a K mask costs the loads their 16-byte vectors."""
    if EVEN_K:
        mask = ok
    else:
        mask = ok & (k3 + k0 < K)
    return mask


@triton.jit
def _gate_up_rows(pid, half, BLOCK_N: tl.constexpr):
    """A program's rows of a fused ``[gate | up]`` weight (``half`` rows each), for the epilogue that writes
    ``silu(gate) * up``: the first ``BLOCK_N // 2`` are gate rows ``j``, the rest the up rows ``half + j`` of the
    same ``j``. Returns (rows, mask)."""
    PAIRS: tl.constexpr = BLOCK_N // 2
    c = tl.arange(0, BLOCK_N)
    j = pid * PAIRS + c % PAIRS
    return j + (c // PAIRS) * half, j < half


@triton.jit
def _store_silu_mul(out_ptr, y, offs_m, M, stride_om, pid, half):
    """Store ``silu(gate) * up`` of a tile ``y [BM, BN]`` laid out by ``_gate_up_rows``, at output columns ``j``:
    the roundings of ``silu_mul_triton`` after a GEMV that wrote ``y`` in the output dtype, so the same bits."""
    BM: tl.constexpr = y.shape[0]
    PAIRS: tl.constexpr = y.shape[1] // 2
    dt = out_ptr.dtype.element_ty
    g, u = tl.split(tl.permute(tl.reshape(y, (BM, 2, PAIRS)), (0, 2, 1)))
    j = pid * PAIRS + tl.arange(0, PAIRS)
    tl.store(out_ptr + offs_m[:, None] * stride_om + j[None, :],
             silu_times(g.to(dt).to(tl.float32), u.to(dt).to(tl.float32), dt).to(dt),
             mask=(offs_m[:, None] < M) & (j[None, :] < half))


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, copies_ptr, M, N, K, stride_xm, stride_wn, stride_om, half,
                 HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr, GATED: tl.constexpr, COPIES: tl.constexpr,
                 PDL: tl.constexpr):
    # GATED: W's rows are [gate | up] (``half`` each) and the program writes silu(gate) * up (_gate_up_rows);
    # COPIES > 0: the result goes to the COPIES addresses in copies_ptr (out_ptr is one of them), not to out_ptr
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if GATED:
        offs_n, n_ok = _gate_up_rows(pid_n, half, BLOCK_N)
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    m3, n3, k3 = offs_m[:, None, None], offs_n[None, :, None], offs_k[None, None, :]
    n_ok3 = n_ok[None, :, None]
    w_ptrs = w_ptr + n3 * stride_wn + k3          # [1, BN, BK]
    x_ptrs = x_ptr + m3 * stride_xm + k3          # [BM, 1, BK]
    if PREFETCH > 0:
        # the first weight tile(s) before waiting for the previous kernel (PDL): no decode kernel writes weights, so
        # a wait on a norm or a TP sum overlaps the start of the weight stream; x is read only after the wait.
        # On 2x H200 (dist_tp_2c521ab.json) one tile took Llama-2-13B TP=2 bs=1 from 222.5 to 228.8 and 231.6
        # tok/s (two runs) with TP=1 unchanged; with the 2048-wide tile of CONFIGS it cost Llama-2-7B/Llama-3-8B
        # bs=1 decode 9 % and 13 % (a dev A/B on one H200), and still 4 % with the next launch moved after the loop
        # (7B, H100: 4.99 -> 5.20 ms/token), so only UNEVEN_K_CONFIGS turn it on (two tiles there). gemv() lowers
        # the count where K has fewer whole tiles.
        w0 = tl.load(w_ptrs, mask=_tile_mask(n_ok3, k3, 0, K, EVEN_K), other=0.0)
        if PREFETCH > 1:
            w1 = tl.load(w_ptrs + BLOCK_K, mask=_tile_mask(n_ok3, k3, BLOCK_K, K, EVEN_K), other=0.0)
        wait_for_inputs(PDL)
        x = tl.load(x_ptrs, mask=_tile_mask(m3 < M, k3, 0, K, EVEN_K), other=0.0)
        acc = x.to(tl.float32) * w0.to(tl.float32)
        if PREFETCH > 1:
            x = tl.load(x_ptrs + BLOCK_K, mask=_tile_mask(m3 < M, k3, BLOCK_K, K, EVEN_K), other=0.0)
            acc += x.to(tl.float32) * w1.to(tl.float32)
        k_start = PREFETCH * BLOCK_K
    else:
        wait_for_inputs(PDL)
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        k_start = 0
    w_ptrs += k_start
    x_ptrs += k_start
    for k0 in range(k_start, K, BLOCK_K):
        w = tl.load(w_ptrs, mask=_tile_mask(n_ok3, k3, k0, K, EVEN_K), other=0.0)
        x = tl.load(x_ptrs, mask=_tile_mask(m3 < M, k3, k0, K, EVEN_K), other=0.0)
        acc += x.to(tl.float32) * w.to(tl.float32)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    # the next kernel launches only now, so its waiting programs take no SM slot from this grid's later ones
    # (bs=1 decode, Llama-2-7B arch bf16, one H100: 5.04 -> 4.99 ms/token; quant_decode.py, same process and card)
    let_next_start(PDL)
    y = tl.sum(acc, axis=2)                       # [BM, BN]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        _store_silu_mul(out_ptr, y, offs_m, M, stride_om, pid_n, half)
    else:
        mask = (offs_m[:, None] < M) & n_ok[None, :]
        at = offs_m[:, None] * stride_om + offs_n[None, :]
        y = y.to(out_ptr.dtype.element_ty)
        if COPIES > 0:
            for i in tl.static_range(COPIES):
                dest = tl.load(copies_ptr.to(tl.pointer_type(tl.uint64)) + i).to(out_ptr.dtype)
                tl.store(dest + at, y, mask=mask)
        else:
            tl.store(out_ptr + at, y, mask=mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None, gated: bool = False, out: torch.Tensor | None = None,
         copies: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x[..., K]`` with few rows, through the Triton GEMV.

    ``gated``: the weight's rows are ``[gate | up]`` and the result ``silu(gate) * up`` ``[..., N / 2]``, written
    by the epilogue with the bits ``silu_mul_triton`` gives the plain result. A Llama-2-7B gate/up at M = 1 then
    takes 58.5 µs where the GEMV and the silu kernel took 59.7 (8 distinct layers back to back in a graph, H100,
    ``benchmarks/kernel_gemv.py``: docs/results/h100/kernel_gemv.json). The same epilogue in the int4/int8 kernels
    made them slower than the launch it saved (a dev micro on the H100: int4 gate/up 23.9 µs against 22.0 for the
    kernel and silu_mul; it was slow with their plain columns too, so the epilogue, not the gate/up column
    order, cost it), so only this GEMV does it.

    ``out``: a ``[rows, N]`` tensor with contiguous rows to write into instead of a new one. ``copies``: an int64
    device tensor of addresses (``out``'s among them) where the epilogue stores the result, each laid out as
    ``out``: a tensor-parallel partial pushed into every rank's sum buffer (``dist.tp.SumAddNorm``).
    """
    N, K = weight.shape
    if x.shape[-1] != K or weight.stride(-1) != 1 or x.dtype != weight.dtype or x.dtype not in DTYPES:
        raise BadInputError(f"gemv: x {tuple(x.shape)} {x.dtype} does not match a contiguous-K weight "
                            f"{tuple(weight.shape)} {weight.dtype} (bf16, fp16 or fp32)")
    if gated and N % 2:
        raise BadInputError(f"gated gemv needs an even number of weight rows (gate then up), got {N}")
    if copies is not None and (out is None or gated or copies.dtype != torch.int64 or copies.dim() != 1):
        raise BadInputError("gemv: copies= is a 1-D int64 tensor of addresses, given with out= and without gated")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    c = config or pick_config(M, K)
    half = N // 2 if gated else 0
    if out is None:
        out = torch.empty(M, half or N, dtype=x.dtype, device=x.device)
    elif out.shape != (M, half or N) or out.dtype != x.dtype or out.stride(-1) != 1:
        raise BadInputError(f"gemv: out {tuple(out.shape)} {out.dtype} is not a [{M}, {half or N}] {x.dtype} tensor "
                            "with contiguous rows")
    launch = {"num_warps": c.num_warps} if x.is_cuda else {}
    launch.update(pdl_launch(x))
    grid_n = triton.cdiv(half, c.block_n // 2) if gated else triton.cdiv(N, c.block_n)
    _gemv_kernel[(grid_n, triton.cdiv(M, c.block_m))](
        x2, weight, bias if bias is not None else weight, out, copies if copies is not None else out, M, N, K,
        x2.stride(0), weight.stride(0), out.stride(0), half, HAS_BIAS=bias is not None, EVEN_K=K % c.block_k == 0,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, PREFETCH=min(c.prefetch, K // c.block_k),
        GATED=gated, COPIES=0 if copies is None else copies.numel(), **launch)
    return out.reshape(*lead, half or N)


class GemvLinear(nn.Linear):
    """``nn.Linear`` that sends decode-sized CUDA inputs (at most ``GEMV_MAX_M`` rows) to ``gemv``."""

    def _takes(self, x: torch.Tensor) -> bool:
        return x.is_cuda and 0 < x.numel() <= GEMV_MAX_M * self.in_features and x.dtype == self.weight.dtype

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None,
                copies: torch.Tensor | None = None) -> torch.Tensor:
        """``out``, ``copies``: where the GEMV stores its ``[rows, out_features]`` result (see ``gemv``); F.linear,
        which runs where the GEMV does not, returns a new tensor, so callers check what they got."""
        if self._takes(x):
            return gemv(x, self.weight, self.bias, out=out, copies=copies)
        return F.linear(x, self.weight, self.bias)

    def forward_silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """``silu_mul(self(x))`` of a fused ``[gate | up]`` layer, in the GEMV's epilogue where it runs."""
        if self._takes(x):
            return gemv(x, self.weight, self.bias, gated=True)
        return silu_mul(F.linear(x, self.weight, self.bias))


def use_gemv_linears_(model: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` of a CUDA bf16/fp16 model into a ``GemvLinear`` (same parameters, no copy);
    returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype in (torch.bfloat16, torch.float16):
            module.__class__ = GemvLinear  # same state, only forward changes: nothing to copy or re-register
            n += 1
    return n
