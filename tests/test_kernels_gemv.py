"""Dense decode GEMV (Triton) vs ``F.linear`` (TRITON_INTERPRET=1 on CPU; tiny shapes), and the layer swap."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from onecard.errors import BadInputError
from onecard.kernels.swiglu import silu_mul, silu_mul_triton
from onecard.kernels.gemv import (
    CONFIGS,
    GEMV_MAX_M,
    K_MULTIPLE,
    UNEVEN_K_CONFIGS,
    GemvConfig,
    GemvLinear,
    gemv,
    pick_config,
    use_gemv_linears_,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("M,K,N,bias,config", [
    (1, 256, 40, False, GemvConfig(1, 4, 64)),      # K a multiple of the block, N not
    (1, 200, 33, True, GemvConfig(1, 8, 64)),       # ragged K (masked tail) and a bias
    (3, 192, 24, False, GemvConfig(4, 4, 64)),      # M below the block: padded rows never stored
    (5, 128, 16, True, GemvConfig(2, 8, 32, 2)),    # several M blocks
    (1, 4096, 12, False, None),                     # the table's own config
])
def test_gemv_matches_linear(M, K, N, bias, config):
    torch.manual_seed(0)
    x, w = torch.randn(M, K, device=DEV), torch.randn(N, K, device=DEV)
    b = torch.randn(N, device=DEV) if bias else None
    torch.testing.assert_close(gemv(x, w, b, config), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("M,K,N,bias,config", [
    (1, 200, 66, True, GemvConfig(1, 8, 64)),       # ragged K, a bias, and 33 pairs: the last program's half-masked
    (3, 192, 24, False, GemvConfig(4, 4, 64)),      # padded rows
    (1, 4096, 12, False, None),                     # the table's config: one pair per program
])
def test_gated_gemv_gives_the_bits_of_silu_mul(M, K, N, bias, config):
    """``gated=True``: rows are [gate | up] and the epilogue writes silu(gate) * up, bit for bit ``silu_mul_triton`` of
    the plain GEMV (fp32 here; bf16 on a GPU)."""
    torch.manual_seed(0)
    dtypes = (torch.float32, torch.bfloat16) if DEV == "cuda" else (torch.float32,)
    for dtype in dtypes:
        x, w = torch.randn(M, K, device=DEV, dtype=dtype), torch.randn(N, K, device=DEV, dtype=dtype)
        b = torch.randn(N, device=DEV, dtype=dtype) if bias else None
        y = gemv(x, w, b, config, gated=True)
        assert y.shape == (M, N // 2)
        assert torch.equal(y, silu_mul_triton(gemv(x, w, b, config)))
    with pytest.raises(BadInputError, match="even number"):
        gemv(x, w[:-1], None, config, gated=True)
    lin = GemvLinear(K, N, bias=bias)
    torch.testing.assert_close(lin.forward_silu_mul(x.cpu().float()), silu_mul(lin(x.cpu().float())), rtol=0, atol=0)


def test_gemv_takes_leading_dims_and_strided_rows():
    torch.manual_seed(0)
    w = torch.randn(24, 64, device=DEV)
    x = torch.randn(1, 2, 128, device=DEV)[..., :64]  # rows 128 apart: the kernel reads the row stride
    torch.testing.assert_close(gemv(x, w, config=GemvConfig(2, 8, 32)), F.linear(x, w), rtol=1e-5, atol=1e-4)
    assert gemv(x, w, config=GemvConfig(2, 8, 32)).shape == (1, 2, 24)


def test_gemv_bf16_accumulates_in_fp32():
    torch.manual_seed(0)
    x, w = torch.randn(1, 512, device=DEV).bfloat16(), torch.randn(64, 512, device=DEV).bfloat16()
    exact = x.float() @ w.float().t()
    out = gemv(x, w, config=GemvConfig(1, 4, 128)).float()
    assert ((out - exact).abs() <= exact.abs() * 2**-7 + 1e-4).all()  # one bf16 step (the final cast) at most


def test_gemv_refuses_mismatched_inputs_in_one_line():
    with pytest.raises(BadInputError, match="does not match a contiguous-K weight"):
        gemv(torch.randn(1, 32), torch.randn(8, 16))
    with pytest.raises(BadInputError, match="does not match"):
        gemv(torch.randn(1, 16).half(), torch.randn(8, 16))
    with pytest.raises(BadInputError, match="powers of two"):
        GemvConfig(1, 3, 64)


def test_table_covers_every_decode_m_and_refuses_beyond():
    assert all(pick_config(m).block_m >= m for m in range(1, GEMV_MAX_M + 1))
    assert pick_config(1, 4 * K_MULTIPLE) == CONFIGS[1] and pick_config(1, 5120) == UNEVEN_K_CONFIGS[1]
    assert GEMV_MAX_M == max(CONFIGS)
    with pytest.raises(BadInputError, match="pass config= or use F.linear"):
        gemv(torch.randn(GEMV_MAX_M + 1, 64, device=DEV), torch.randn(8, 64, device=DEV))


def test_use_gemv_linears_swaps_half_precision_linears_only_and_keeps_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8, bias=False)).bfloat16()
    model.append(nn.Linear(8, 8))  # fp32: left alone
    x = torch.randn(1, 16).bfloat16()
    before = model[:3](x)
    weight = model[0].weight
    assert use_gemv_linears_(model) == 2
    assert type(model[0]) is GemvLinear and type(model[2]) is GemvLinear and type(model[3]) is nn.Linear
    assert model[0].weight is weight  # same parameter, nothing copied
    assert torch.equal(model[:3](x), before)  # on CPU the swapped layer still calls F.linear


def test_engine_turns_the_gemv_off_with_speculation_and_refuses_both():
    """A verify step's k+1 rows go through cuBLAS, which rounds unlike the GEMV: with both, greedy speculative output
    would differ from plain decoding, so None resolves to off and an explicit True is a one-line error."""
    from onecard.engine.config import EngineConfig

    assert EngineConfig("m").uses_gemv(is_cuda=True) and not EngineConfig("m").uses_gemv(is_cuda=False)
    assert not EngineConfig("m", num_speculative_tokens=3).uses_gemv(is_cuda=True)
    assert not EngineConfig("m", decode_gemv=False).uses_gemv(is_cuda=True)
    with pytest.raises(BadInputError, match="decode_gemv=True: speculative decoding.*leave decode_gemv=None"):
        EngineConfig("m", decode_gemv=True, num_speculative_tokens=3)


@pytest.mark.parametrize("prefetch", [1, 2])
@pytest.mark.parametrize("K", [16, 48, 64, 80])  # under one tile, a tile and a half, two whole tiles, a ragged third
def test_prefetching_the_first_tiles_gives_the_same_bits(K, prefetch):
    """``prefetch`` only moves the first weight tiles' loads before the PDL wait (fewer where K has fewer whole
    tiles); the sum must not change."""
    torch.manual_seed(0)
    x, w = torch.randn(1, K, device=DEV), torch.randn(24, K, device=DEV)
    plain = gemv(x, w, config=GemvConfig(1, 2, 32, 2))
    early = gemv(x, w, config=GemvConfig(1, 2, 32, 2, prefetch=prefetch))
    assert torch.equal(plain, early)
    torch.testing.assert_close(early, F.linear(x, w), rtol=1e-4, atol=1e-4)


def test_gemv_writes_into_a_given_buffer_and_refuses_a_wrong_one():
    """``out``: a tensor-parallel sum's buffer rows receive the result in place (the same bits as a new tensor)."""
    torch.manual_seed(0)
    x, w = torch.randn(1, 64, device=DEV), torch.randn(24, 64, device=DEV)
    buffer = torch.zeros(2, 4, 24, device=DEV)
    config = GemvConfig(1, 2, 32, 2)
    y = gemv(x, w, config=config, out=buffer[1, :1])
    assert y.data_ptr() == buffer[1, 0].data_ptr() and torch.equal(buffer[1, :1], gemv(x, w, config=config))
    assert not buffer[0].any() and not buffer[1, 1:].any()
    with pytest.raises(BadInputError, match=r"out \(2, 24\).*not a \[1, 24\]"):
        gemv(x, w, out=buffer[0, :2])


def test_gemv_pushes_its_result_to_every_address_given():
    """``copies``: the epilogue stores the result at each address (a TP partial into every rank's sum buffer)."""
    torch.manual_seed(0)
    x, w = torch.randn(1, 64, device=DEV), torch.randn(24, 64, device=DEV)
    a, b = torch.zeros(3, 24, device=DEV), torch.zeros(2, 24, device=DEV)
    addresses = torch.tensor([a[1].data_ptr(), b[0].data_ptr()], dtype=torch.int64, device=DEV)
    y = gemv(x, w, config=GemvConfig(1, 2, 32, 2), out=a[1:2], copies=addresses)
    expect = gemv(x, w, config=GemvConfig(1, 2, 32, 2))
    assert y.data_ptr() == a[1].data_ptr() and torch.equal(a[1:2], expect) and torch.equal(b[:1], expect)
    assert not a[0].any() and not a[2].any() and not b[1].any()
    with pytest.raises(BadInputError, match="copies="):
        gemv(x, w, copies=addresses)
