"""A tensor-parallel layer's partial sums, the residual add and the next RMSNorm in one kernel (GPUs with P2P).

Why: under TP=2 a 13B decode step makes 80 row-parallel sums of ~10 KB each.
Through PyTorch's symmetric-memory one-shot all-reduce each sum is a kernel of
its own, outside the chain of programmatic dependent launches (PDL) the other
decode kernels form, and an add+norm kernel follows it: a profile of rank 0
(docs/results/dist_tp.json) showed 7.1 us per sum and the GPU idle 7 % of the
step. This kernel joins the PDL chain and does the sum, the add and the norm.

Protocol: low-latency (LL) words, as NCCL's LL protocol sends them. A sum is
latency-bound (a few KB), so what counts is how many NVLink crossings it waits
for. A flag raised after the data needs a system-scope fence (the writes
acknowledged: one round trip) and then the flag's own crossing; pulling the
peers' rows after seeing their flags adds another round trip. Here each
element goes out as one 8-byte word, its fp32 bits beside the call's epoch,
written straight into every peer's buffer; 8-byte stores arrive whole, so a
word that shows this call's epoch holds this call's value, and a rank waits for
its peers' words in its own memory: one one-way crossing, no fences, no flags.

The epoch is a counter per (slot, row) in each rank's own memory that the
kernel advances, so it is CUDA-graph safe (nothing from the host) and, since
every rank makes the same calls, the same on every rank; words never need
clearing because a stale one carries an older epoch. Two buffer slots alternate
by call site (the sum after attention uses slot 0, the one after the MLP slot
1): a rank writes a peer's slot again two sums later, after the sum between
has received that peer's words, which the peer sends only once it finished
reading the slot. Sums in rank order in fp32, so every rank gets the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from onecard.kernels.launch import pdl_launch, start_after_inputs
from onecard.kernels.rmsnorm import add_rmsnorm_row, row_launch

@triton.jit
def _sum_add_rmsnorm_fwd(X, R, W, Y, S, BUF_PTRS, EPOCHS, stride_x, stride_r, stride_y, stride_s, N, eps, slot,
                         RANK: tl.constexpr, WORLD: tl.constexpr, MAX_ROWS: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    start_after_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    epoch_at = EPOCHS + slot * MAX_ROWS + row
    epoch = tl.load(epoch_at) + 1
    tag = epoch.to(tl.int64) << 32
    word = tag | x.to(tl.float32).to(tl.uint32, bitcast=True).to(tl.int64)  # zero-extended bits
    bufs = BUF_PTRS.to(tl.pointer_type(tl.uint64))
    at = (slot * MAX_ROWS + row) * WORLD * N  # [slot, row, sender, N] words
    for r in tl.static_range(WORLD):
        if r != RANK:
            peer = tl.load(bufs + r).to(tl.pointer_type(tl.int64))
            tl.store(peer + at + RANK * N + cols, word, mask=mask)
    mine = tl.load(bufs + RANK).to(tl.pointer_type(tl.int64))
    acc = tl.zeros([BLOCK], tl.float32)
    for r in tl.static_range(WORLD):
        if r == RANK:
            acc += x.to(tl.float32)
        else:
            words = mine + at + r * N + cols
            got = tl.load(words, mask=mask, other=tag, volatile=True)
            while tl.min(((got >> 32) == epoch).to(tl.int32), axis=0) == 0:
                got = tl.load(words, mask=mask, other=tag, volatile=True)
            acc += got.to(tl.int32).to(tl.float32, bitcast=True)  # the low 32 bits
    tl.store(epoch_at, epoch)
    h = acc.to(X.dtype.element_ty).to(tl.float32)  # the sum in the model's dtype, as an all-reduce returns it
    add_rmsnorm_row(h, R, W, Y, S, row, cols, mask, stride_r, stride_y, stride_s, N, eps)


def buffer_words(max_rows: int, world: int, hidden: int) -> int:
    """int64 words of each rank's symmetric buffer: ``[2 slots, max_rows, world senders, hidden]``."""
    return 2 * max_rows * world * hidden


def sum_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, buffer_ptrs: int,
                    epochs: torch.Tensor, slot: int, rank: int, world: int,
                    max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rmsnorm(sum over ranks of x, residual)`` -> ``(normed, new residual)`` on every rank.

    ``x`` is ``[rows <= max_rows, N]``, this rank's partial; ``buffer_ptrs`` is the device address of the
    symmetric buffers' pointer array (each ``buffer_words`` int64 zeros at the start); ``epochs`` this rank's own
    ``[2 * max_rows]`` int32 zeros at the start; every rank must make the same calls (shapes, ``slot``: see the
    module doc)."""
    M, N = x.shape
    y = torch.empty((M, N), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    s = torch.empty_like(residual)
    _sum_add_rmsnorm_fwd[(M,)](x, residual, weight, y, s, buffer_ptrs, epochs, x.stride(0), residual.stride(0),
                               y.stride(0), s.stride(0), N, eps, slot, RANK=rank, WORLD=world, MAX_ROWS=max_rows,
                               **row_launch(N), **pdl_launch(x))
    return y, s
