"""A tensor-parallel layer's partial sums, the residual add and the next RMSNorm in one kernel (GPUs with P2P).

Why: under TP=2 a 13B decode step makes 80 row-parallel sums of ~10 KB each.
Through PyTorch's symmetric-memory one-shot all-reduce each sum is a kernel of
its own, outside the chain of programmatic dependent launches (PDL) the other
decode kernels form, and an add+norm kernel follows it: a profile of rank 0
(docs/multi-gpu.md) showed 7.1 us per sum and the GPU idle 7 % of the
step. This kernel joins the PDL chain and does the sum, the add and the norm.

Protocol, one program per row and the same on every rank. Each rank's buffer
holds ``[2 slots, world senders, rows, hidden]``. Push this rank's partial row
into its sender area of every rank's buffer (at bs=1 the row-parallel GEMV's
epilogue has pushed it already: ``in_buffer``, so this kernel stores nothing);
raise this rank's flag in every rank's flag pad (release, system scope); wait for
every rank's flag in its own pad and clear it (acquire); sum every sender's row
from its own buffer in rank order, so every rank gets the same bits and no read
crosses NVLink. Two buffer slots alternate by call site (the sum after attention
uses slot 0, the one after the MLP slot 1): a rank writes a slot again only two
sums later, after the sum between has seen every peer's flag, which each peer
raises only once its kernels before it, the reads of that slot included, have
finished. So no trailing barrier, and the flags reset themselves (CUDA-graph
safe: no counter from the host).

Measured on 2x H200 (Llama-2-13B bs=1 decode, TP=2 tok/s, docs/results/dist_tp*.json): the partial copied in by
this kernel and pulled over NVLink, 241.0; the GEMV writing it into its own rank's buffer, 247.3 and 254.7 (one
lease); on another lease that 247.7 and 246.7 against 250.0 and 251.0 with the GEMV pushing it to every rank.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from onecard.kernels.launch import let_next_start, pdl_launch, wait_for_inputs
from onecard.kernels.rmsnorm import add_rmsnorm_row, residual_and_weight, row_launch


@triton.jit
def _sum_add_rmsnorm_fwd(X, R, W, Y, S, BUF_PTRS, FLAG_PTRS, stride_x, stride_r, stride_y, stride_s, N, eps, slot,
                         RANK: tl.constexpr, WORLD: tl.constexpr, MAX_ROWS: tl.constexpr, IN_BUFFER: tl.constexpr,
                         BLOCK: tl.constexpr, PDL: tl.constexpr):
    let_next_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    res, w = residual_and_weight(R, W, row, cols, mask, stride_r)
    bufs = BUF_PTRS.to(tl.pointer_type(tl.uint64))
    ranks = tl.arange(0, WORLD)
    pads = FLAG_PTRS.to(tl.pointer_type(tl.uint64))
    at_flag = (slot * MAX_ROWS + row) * WORLD
    theirs = tl.load(pads + ranks).to(tl.pointer_type(tl.int32)) + at_flag + RANK
    own = tl.load(pads + RANK).to(tl.pointer_type(tl.int32)) + at_flag + ranks
    mine = tl.load(bufs + RANK).to(tl.pointer_type(X.dtype.element_ty))
    wait_for_inputs(PDL)
    if not IN_BUFFER:  # else the row-parallel GEMV pushed x into every rank's buffer, and the wait saw it finish
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        for r in tl.static_range(WORLD):
            dest = tl.load(bufs + r).to(tl.pointer_type(X.dtype.element_ty))
            tl.store(dest + _area(slot, RANK, row, WORLD, MAX_ROWS, N) + cols, x, mask=mask)
        tl.debug_barrier()  # the whole row is written before the flags go up
    tl.atomic_xchg(theirs, tl.full([WORLD], 1, tl.int32), sem="release", scope="sys")
    seen = tl.zeros([WORLD], tl.int32)
    while tl.min(seen, axis=0) == 0:
        old = tl.atomic_cas(own, tl.full([WORLD], 1, tl.int32), tl.zeros([WORLD], tl.int32), sem="acquire",
                            scope="sys")
        seen = tl.maximum(seen, (old == 1).to(tl.int32))
    tl.debug_barrier()  # no thread reads a peer's row before every flag was seen
    acc = tl.zeros([BLOCK], tl.float32)
    for r in tl.static_range(WORLD):  # every row is in this rank's own buffer now
        acc += tl.load(mine + _area(slot, r, row, WORLD, MAX_ROWS, N) + cols, mask=mask, other=0.0,
                       volatile=True).to(tl.float32)
    h = acc.to(X.dtype.element_ty).to(tl.float32)  # the sum in the model's dtype, as an all-reduce returns it
    add_rmsnorm_row(h, res, w, Y, S, row, cols, mask, stride_y, stride_s, N, eps)


@triton.jit
def _area(slot, sender, row, WORLD: tl.constexpr, MAX_ROWS: tl.constexpr, N):
    """Offset of ``sender``'s ``row`` of ``slot`` in a buffer laid out ``[2, WORLD, MAX_ROWS, N]``."""
    return ((slot * WORLD + sender) * MAX_ROWS + row) * N


def sum_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, buffer_ptrs: int,
                    flag_ptrs: int, slot: int, rank: int, world: int, max_rows: int,
                    in_buffer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rmsnorm(sum over ranks of x, residual)`` -> ``(normed, new residual)`` on every rank.

    ``x`` is ``[rows <= max_rows, N]``, this rank's partial; ``buffer_ptrs`` / ``flag_ptrs`` are the device
    addresses of the symmetric buffers' pointer arrays (``[2, world, max_rows, N]`` of x's dtype: slot, sender,
    row; and ``[2, max_rows, world]`` int32 zeros); every rank must call this with the same shapes and ``slot`` (see
    the module doc). ``in_buffer``: the kernel before already stored ``x`` as this rank's rows of ``slot`` in every
    rank's buffer (``x`` is its own copy), so this kernel stores nothing before raising its flags."""
    M, N = x.shape
    y = torch.empty((M, N), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    s = torch.empty_like(residual)
    _sum_add_rmsnorm_fwd[(M,)](x, residual, weight, y, s, buffer_ptrs, flag_ptrs, x.stride(0), residual.stride(0),
                               y.stride(0), s.stride(0), N, eps, slot, RANK=rank, WORLD=world, MAX_ROWS=max_rows,
                               IN_BUFFER=in_buffer,
                               **row_launch(N), **pdl_launch(x))
    return y, s
