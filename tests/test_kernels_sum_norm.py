"""The fused tensor-parallel sum + residual add + RMSNorm kernel on one rank (TRITON_INTERPRET=1 on CPU): with
WORLD=1 the flag protocol runs against itself, so the kernel must reproduce the add+norm kernel bit for bit and leave
every flag cleared, in both buffer slots. Two ranks on GPUs: tests/test_dist_tp.py."""

from __future__ import annotations

import pytest
import torch

from onecard.kernels.rmsnorm import add_rmsnorm_triton
from onecard.kernels.sum_norm import sum_add_rmsnorm

pytest.importorskip("triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_rank_equals_add_rmsnorm_and_clears_its_flags(dtype):
    torch.manual_seed(0)
    hidden, max_rows = 96, 4  # a row narrower than its power-of-two block: the mask matters
    buffer = torch.zeros(2 * max_rows * hidden, dtype=dtype)
    flags = torch.zeros(2 * max_rows, dtype=torch.int32)
    buffer_ptrs = torch.tensor([buffer.data_ptr()], dtype=torch.int64)
    flag_ptrs = torch.tensor([flags.data_ptr()], dtype=torch.int64)
    for slot, rows in ((0, 3), (1, 4), (0, 1)):
        x, residual = torch.randn(rows, hidden, dtype=dtype), torch.randn(rows, hidden, dtype=dtype)
        w = torch.rand(hidden, dtype=dtype) + 0.5
        y, s = sum_add_rmsnorm(x, residual, w, 1e-5, buffer_ptrs.data_ptr(), flag_ptrs.data_ptr(), slot, 0, 1,
                               max_rows)
        y_ref, s_ref = add_rmsnorm_triton(x, residual, w, 1e-5)
        assert torch.equal(y, y_ref) and torch.equal(s, s_ref)
        assert torch.equal(buffer.view(2, max_rows, hidden)[slot, :rows], x)  # the row went through the buffer
        assert not flags.any()
