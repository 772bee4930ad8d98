"""The fused tensor-parallel sum + residual add + RMSNorm kernel's protocol on CPU (TRITON_INTERPRET=1).

Two ranks cannot run at once in the interpreter, so rank 1's side is played by the test: its words are placed in
rank 0's buffer (the call's epoch beside each value's fp32 bits), then rank 0's kernel runs. It must send its own
words into rank 1's buffer, sum in rank order, add and normalise bit for bit as the add+norm kernel does on the
summed rows, and advance its epoch; a word of an older epoch must not be taken. Two ranks on GPUs, where both run at
once: tests/test_dist_tp.py."""

from __future__ import annotations

import threading

import pytest
import torch

from onecard.kernels.rmsnorm import add_rmsnorm_triton
from onecard.kernels.sum_norm import buffer_words, sum_add_rmsnorm

pytest.importorskip("triton")

HIDDEN, MAX_ROWS, WORLD = 96, 4, 2  # a row narrower than its power-of-two block: the mask matters


def words(x: torch.Tensor, epoch: int) -> torch.Tensor:
    """``x``'s elements as the kernel sends them: epoch in the high 32 bits, the fp32 bits in the low."""
    return (epoch << 32) | (x.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF)


def grid(rows: int, dtype: torch.dtype) -> torch.Tensor:
    """Random multiples of 1/8 in [-8, 8): two of them sum exactly even in bf16, so the sum's rounding (the
    interpreter's fp32 -> bf16 is not torch's) cannot hide a wrong or missing term."""
    return (torch.randint(-64, 64, (rows, HIDDEN)) / 8).to(dtype)


def buffers() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bufs = torch.zeros(WORLD, buffer_words(MAX_ROWS, WORLD, HIDDEN), dtype=torch.int64)
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    return bufs.view(WORLD, 2, MAX_ROWS, WORLD, HIDDEN), ptrs, torch.zeros(2 * MAX_ROWS, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank0_sends_its_words_and_sums_its_peers(dtype):
    torch.manual_seed(0)
    bufs, ptrs, epochs = buffers()
    for call, (slot, rows) in enumerate(((0, 3), (1, 4), (0, 1), (0, 3))):
        x0, x1, residual = grid(rows, dtype), grid(rows, dtype), torch.randn(rows, HIDDEN, dtype=dtype)
        w = torch.rand(HIDDEN, dtype=dtype) + 0.5
        epoch = epochs.view(2, MAX_ROWS)[slot, :rows] + 1
        bufs[0, slot, :rows, 1] = words(x1, 0) | (epoch.to(torch.int64)[:, None] << 32)  # rank 1's words arrived
        y, s = sum_add_rmsnorm(x0, residual, w, 1e-5, ptrs.data_ptr(), epochs, slot, 0, WORLD, MAX_ROWS)
        y_ref, s_ref = add_rmsnorm_triton((x0.float() + x1.float()).to(dtype), residual, w, 1e-5)
        assert torch.equal(y, y_ref) and torch.equal(s, s_ref), f"call {call}"
        sent = bufs[1, slot, :rows, 0]
        assert torch.equal(sent >> 32, epoch.to(torch.int64)[:, None].expand_as(sent)), "rank 1 got the epoch"
        assert torch.equal((sent & 0xFFFFFFFF).to(torch.int32).view(torch.float32), x0.float()), "and the values"
        assert torch.equal(epochs.view(2, MAX_ROWS)[slot, :rows], epoch), "the epoch advanced"


def test_a_word_of_an_older_epoch_is_waited_for():
    """A stale word (an earlier call's) must hold the kernel until the current one arrives: a rank that took it
    would sum a value from the previous layer."""
    bufs, ptrs, epochs = buffers()
    epochs[0] = 6  # this call's epoch is 7; rank 1's word so far is from epoch 6
    x0, x1, residual = grid(1, torch.float32), grid(1, torch.float32), torch.randn(1, HIDDEN)
    w = torch.ones(HIDDEN)
    bufs[0, 0, :1, 1] = words(torch.full((1, HIDDEN), 1e6), 6)
    bufs[0, 0, 0, 1, -1] = words(x1[:, -1:], 7)[0, 0]  # one element already new: not enough
    out = {}
    worker = threading.Thread(target=lambda: out.update(y=sum_add_rmsnorm(
        x0, residual, w, 1e-5, ptrs.data_ptr(), epochs, 0, 0, WORLD, MAX_ROWS)[0]))
    worker.start()
    worker.join(timeout=3)
    assert worker.is_alive(), "the kernel went on with words of an older epoch"
    bufs[0, 0, :1, 1] = words(x1, 7)  # rank 1's words of this call arrive
    worker.join(timeout=60)
    assert not worker.is_alive()
    torch.testing.assert_close(out["y"], add_rmsnorm_triton(x0 + x1, residual, w, 1e-5)[0])
