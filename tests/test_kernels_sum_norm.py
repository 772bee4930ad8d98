"""The fused tensor-parallel sum + residual add + RMSNorm kernel's protocol on CPU (TRITON_INTERPRET=1): with
WORLD=1 the flag protocol runs against itself, so the kernel must reproduce the add+norm kernel bit for bit and leave
every flag cleared, in both buffer slots; with WORLD=2 rank 0's kernel runs while the test plays rank 1 (its row and
flag placed beforehand, or late). Two ranks at once on GPUs: tests/test_dist_tp.py."""

from __future__ import annotations

import threading

import pytest
import torch

from onecard.kernels.rmsnorm import add_rmsnorm_triton
from onecard.kernels.sum_norm import sum_add_rmsnorm

pytest.importorskip("triton")

HIDDEN, MAX_ROWS = 96, 4  # a row narrower than its power-of-two block: the mask matters


def grid(rows: int, dtype: torch.dtype) -> torch.Tensor:
    """Random multiples of 1/8 in [-8, 8): two of them sum exactly even in bf16, so the sum's rounding (the
    interpreter's fp32 -> bf16 is not torch's) cannot hide a wrong or missing term."""
    return (torch.randint(-64, 64, (rows, HIDDEN)) / 8).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_rank_equals_add_rmsnorm_and_clears_its_flags(dtype):
    torch.manual_seed(0)
    buffer = torch.zeros(2 * MAX_ROWS * HIDDEN, dtype=dtype)
    flags = torch.zeros(2 * MAX_ROWS, dtype=torch.int32)
    buffer_ptrs = torch.tensor([buffer.data_ptr()], dtype=torch.int64)
    flag_ptrs = torch.tensor([flags.data_ptr()], dtype=torch.int64)
    for slot, rows in ((0, 3), (1, 4), (0, 1)):
        x, residual = torch.randn(rows, HIDDEN, dtype=dtype), torch.randn(rows, HIDDEN, dtype=dtype)
        w = torch.rand(HIDDEN, dtype=dtype) + 0.5
        y, s = sum_add_rmsnorm(x, residual, w, 1e-5, buffer_ptrs.data_ptr(), flag_ptrs.data_ptr(), slot, 0, 1,
                               MAX_ROWS)
        y_ref, s_ref = add_rmsnorm_triton(x, residual, w, 1e-5)
        assert torch.equal(y, y_ref) and torch.equal(s, s_ref)
        assert torch.equal(buffer.view(2, MAX_ROWS, HIDDEN)[slot, :rows], x)  # the row went through the buffer
        assert not flags.any()


def two_ranks(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both ranks' buffers [rank, slot, sender, row, hidden] and flag pads [rank, slot, row, sender], and their
    pointer arrays: rank 0's kernel runs, rank 1's side is played by the test."""
    buffers = torch.zeros(2, 2, 2, MAX_ROWS, HIDDEN, dtype=dtype)
    pads = torch.zeros(2, 2, MAX_ROWS, 2, dtype=torch.int32)
    return (buffers, pads, torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64),
            torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank0_of_two_sums_its_peers_row_and_raises_its_flag(dtype):
    """Rank 1 pushed its row into rank 0's buffer and raised its flag in rank 0's pad; rank 0 must push its row into
    both buffers, raise its flag in rank 1's pad, clear its own pad and return the add+norm of the two rows' sum."""
    torch.manual_seed(0)
    buffers, pads, buffer_ptrs, flag_ptrs = two_ranks(dtype)
    for slot, rows in ((0, 3), (1, 4), (0, 1)):
        x0, x1 = grid(rows, dtype), grid(rows, dtype)
        residual, w = torch.randn(rows, HIDDEN, dtype=dtype), torch.rand(HIDDEN, dtype=dtype) + 0.5
        buffers[0, slot, 1, :rows] = x1
        pads[0, slot, :rows, 1] = 1
        y, s = sum_add_rmsnorm(x0, residual, w, 1e-5, buffer_ptrs.data_ptr(), flag_ptrs.data_ptr(), slot, 0, 2,
                               MAX_ROWS)
        y_ref, s_ref = add_rmsnorm_triton((x0.float() + x1.float()).to(dtype), residual, w, 1e-5)
        assert torch.equal(y, y_ref) and torch.equal(s, s_ref)
        assert torch.equal(buffers[1, slot, 0, :rows], x0), "rank 0's row is pushed into rank 1's buffer"
        assert torch.equal(buffers[0, slot, 0, :rows], x0) and not buffers[1, :, 1].any()
        assert pads[1, slot, :rows, 0].eq(1).all(), "rank 0 raised its flag in rank 1's pad"
        assert not pads[0].any(), "rank 0 cleared its own pad"
        pads[1].zero_()  # rank 1 would clear it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_partial_already_in_the_buffer_is_summed_in_place(dtype):
    """``in_buffer``: the row-parallel GEMV pushed rank 0's rows into both buffers; the kernel must store nothing, sum
    them from its own buffer and give the bits of the copying path."""
    torch.manual_seed(0)
    buffers, pads, buffer_ptrs, flag_ptrs = two_ranks(dtype)
    for slot, rows in ((0, 3), (1, 1)):
        x0, x1 = grid(rows, dtype), grid(rows, dtype)
        residual, w = torch.randn(rows, HIDDEN, dtype=dtype), torch.rand(HIDDEN, dtype=dtype) + 0.5
        buffers[0, slot, 0, :rows], buffers[0, slot, 1, :rows] = x0, x1
        pads[0, slot, :rows, 1] = 1
        y, s = sum_add_rmsnorm(buffers[0, slot, 0, :rows], residual, w, 1e-5, buffer_ptrs.data_ptr(),
                               flag_ptrs.data_ptr(), slot, 0, 2, MAX_ROWS, in_buffer=True)
        y_ref, s_ref = add_rmsnorm_triton((x0.float() + x1.float()).to(dtype), residual, w, 1e-5)
        assert torch.equal(y, y_ref) and torch.equal(s, s_ref)
        assert not buffers[1].any(), "nothing stored into rank 1's buffer: the GEMV pushed there"
        assert pads[1, slot, :rows, 0].eq(1).all()
        assert not pads[0].any()
        pads[1].zero_()


def test_rank0_waits_for_its_peers_flag():
    """Without rank 1's flag the kernel must not read rank 1's row (it may be the previous layer's)."""
    buffers, pads, buffer_ptrs, flag_ptrs = two_ranks(torch.float32)
    x0, x1, residual, w = grid(1, torch.float32), grid(1, torch.float32), torch.randn(1, HIDDEN), torch.ones(HIDDEN)
    buffers[0, 0, 1, :1] = 1e6  # stale
    out = {}
    worker = threading.Thread(target=lambda: out.update(y=sum_add_rmsnorm(
        x0, residual, w, 1e-5, buffer_ptrs.data_ptr(), flag_ptrs.data_ptr(), 0, 0, 2, MAX_ROWS)[0]))
    worker.start()
    worker.join(timeout=3)
    assert worker.is_alive(), "the kernel went on without rank 1's flag"
    buffers[0, 0, 1, :1] = x1
    pads[0, 0, 0, 1] = 1
    worker.join(timeout=60)
    assert not worker.is_alive()
    torch.testing.assert_close(out["y"], add_rmsnorm_triton(x0 + x1, residual, w, 1e-5)[0])
