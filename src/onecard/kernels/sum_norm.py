"""A tensor-parallel layer's partial sums, the residual add and the next RMSNorm in one kernel (GPUs with P2P).

Why: under TP=2 a 13B decode step makes 80 row-parallel sums of ~10 KB each.
Through PyTorch's symmetric-memory one-shot all-reduce each sum is a kernel of
its own, outside the chain of programmatic dependent launches (PDL) the other
decode kernels form, and an add+norm kernel follows it: a profile of rank 0
(docs/multi-gpu.md) showed 7.1 us per sum and the GPU idle 7 % of the
step. This kernel joins the PDL chain and does the sum, the add and the norm.

Protocol, one program per row and the same on every rank: write this rank's
partial row into its symmetric buffer (at bs=1 the row-parallel GEMV has written
it there already: ``in_buffer``, which on one 2x H200 lease took Llama-2-13B
TP=2 bs=1 from 241.0 to 247.3 and 254.7 tok/s, docs/results/dist_tp*.json); raise this rank's flag in every rank's
flag pad (release, system scope); wait for every rank's flag in its own pad and
clear it (acquire); read every rank's row over NVLink and sum in rank order, so
every rank gets the same bits. Two buffer slots alternate by call site (the sum
after attention uses slot 0, the one after the MLP slot 1): a rank writes a slot
again only two sums later, after the sum between has seen every peer's flag,
which each peer raises only once it finished reading. So no trailing barrier,
and the flags reset themselves (CUDA-graph safe: no counter from the host).
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
    wait_for_inputs(PDL)
    at = (slot * MAX_ROWS + row) * N
    bufs = BUF_PTRS.to(tl.pointer_type(tl.uint64))
    mine = tl.load(bufs + RANK).to(tl.pointer_type(X.dtype.element_ty))
    if not IN_BUFFER:  # else the row-parallel GEMV wrote x there, and the wait above saw it finish
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        tl.store(mine + at + cols, x, mask=mask)
        tl.debug_barrier()  # the whole row is written before the flags go up
    ranks = tl.arange(0, WORLD)
    pads = FLAG_PTRS.to(tl.pointer_type(tl.uint64))
    at_flag = (slot * MAX_ROWS + row) * WORLD
    theirs = tl.load(pads + ranks).to(tl.pointer_type(tl.int32)) + at_flag + RANK
    tl.atomic_xchg(theirs, tl.full([WORLD], 1, tl.int32), sem="release", scope="sys")
    own = tl.load(pads + RANK).to(tl.pointer_type(tl.int32)) + at_flag + ranks
    seen = tl.zeros([WORLD], tl.int32)
    while tl.min(seen, axis=0) == 0:
        old = tl.atomic_cas(own, tl.full([WORLD], 1, tl.int32), tl.zeros([WORLD], tl.int32), sem="acquire",
                            scope="sys")
        seen = tl.maximum(seen, (old == 1).to(tl.int32))
    tl.debug_barrier()  # no thread reads a peer's row before every flag was seen
    acc = tl.zeros([BLOCK], tl.float32)
    for r in tl.static_range(WORLD):
        if r == RANK and not IN_BUFFER:
            acc += x.to(tl.float32)
        elif r == RANK:
            acc += tl.load(mine + at + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            peer = tl.load(bufs + r).to(tl.pointer_type(X.dtype.element_ty))
            acc += tl.load(peer + at + cols, mask=mask, other=0.0, volatile=True).to(tl.float32)
    h = acc.to(X.dtype.element_ty).to(tl.float32)  # the sum in the model's dtype, as an all-reduce returns it
    add_rmsnorm_row(h, res, w, Y, S, row, cols, mask, stride_y, stride_s, N, eps)


def sum_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, buffer_ptrs: int,
                    flag_ptrs: int, slot: int, rank: int, world: int, max_rows: int,
                    in_buffer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rmsnorm(sum over ranks of x, residual)`` -> ``(normed, new residual)`` on every rank.

    ``x`` is ``[rows <= max_rows, N]``, this rank's partial; ``buffer_ptrs`` / ``flag_ptrs`` are the device
    addresses of the symmetric buffers' pointer arrays (``[2, max_rows, N]`` of x's dtype and ``[2, max_rows,
    world]`` int32 zeros); every rank must call this with the same shapes and ``slot`` (see the module doc).
    ``in_buffer``: ``x`` is already this rank's buffer rows of ``slot`` (written there by the kernel before), so the
    copy into the buffer, and its wait on a load, are skipped."""
    M, N = x.shape
    y = torch.empty((M, N), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    s = torch.empty_like(residual)
    _sum_add_rmsnorm_fwd[(M,)](x, residual, weight, y, s, buffer_ptrs, flag_ptrs, x.stride(0), residual.stride(0),
                               y.stride(0), s.stride(0), N, eps, slot, RANK=rank, WORLD=world, MAX_ROWS=max_rows,
                               IN_BUFFER=in_buffer,
                               **row_launch(N), **pdl_launch(x))
    return y, s
