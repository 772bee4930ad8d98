"""``Fp8Linear`` (quantization='fp8'): e4m3 weights per output channel, activations per token, ``_scaled_mm``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from onecard.errors import BadInputError
from onecard.kernels.fp8_quant import (FP8, FP8_MAX, MIN_SCALE, quantize_rows, quantize_rows_reference,
                                       quantize_rows_triton, rowwise_fp8_problem)
from onecard.quant.fp8 import Fp8Linear


def test_quantize_rows_keeps_each_rows_amax_and_e4m3_precision():
    x = torch.randn(6, 64) * torch.logspace(-3, 3, 6)[:, None]  # rows six decades apart: one scale each
    x[2] = 0.0
    codes, scale = quantize_rows(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (6, 1)
    back = codes.float() * scale
    assert torch.equal(back[2], torch.zeros(64)) and torch.isfinite(scale).all()
    big = x.abs() > x.abs().amax(-1, keepdim=True) / 64  # e4m3 normals: 3 mantissa bits, <= 1/16 relative error
    assert ((back - x).abs() <= x.abs() / 16 + 1e-12)[big].all()
    assert torch.equal(codes.float().abs().amax(-1)[[0, 1, 3, 4, 5]], torch.full((5,), FP8_MAX))


@pytest.mark.parametrize("one_pass_max", [16384, 1024])
def test_quantize_rows_kernel_in_the_interpreter(monkeypatch, one_pass_max):
    """Rows of e4m3 grid values times a power of two: the scale comes out exact and the codes need no rounding (the
    interpreter's fp8 rounding is wrong where it carries into the exponent; exact codes are compared on CUDA).
    K = 1100: one pass (the row in registers), and two passes crossing the 1024-wide tile; the rows are strided; one
    row is zeros."""
    import onecard.kernels.fp8_quant as fp8_quant

    monkeypatch.setattr(fp8_quant, "ONE_PASS_MAX", one_pass_max)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (5, 1100), generator=g, dtype=torch.uint8).view(FP8).float()
    codes = torch.where(codes.isnan(), torch.zeros_like(codes), codes)
    codes[:, 7] = FP8_MAX
    codes[3] = 0.0
    scales = 2.0 ** torch.tensor([-12.0, -3.0, 0.0, 0.0, 5.0])
    wide = torch.zeros(5, 1200, dtype=torch.bfloat16)
    wide[:, :1100] = (codes * scales[:, None]).to(torch.bfloat16)
    x = wide[:, :1100]
    q, s = quantize_rows_triton(x)
    ref_q, ref_s = quantize_rows_reference(x)
    assert torch.equal(s, ref_s) and torch.equal(s[[0, 1, 2, 4], 0], scales[[0, 1, 2, 4]]) and s[3, 0] == MIN_SCALE
    assert torch.equal(q.float(), codes) and torch.equal(q.float(), ref_q.float())


def test_fp8_linear_matches_its_dequantized_weights():
    torch.manual_seed(0)
    lin = nn.Linear(128, 96, bias=True)
    q = Fp8Linear.from_linear(lin)
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale.shape == (1, 96)
    x = torch.randn(3, 5, 128)
    codes, scale = quantize_rows(x.reshape(-1, 128))
    want = (codes.float() * scale) @ q.dequantized_weight().t() + lin.bias.data
    got = q(x)
    assert got.shape == (3, 5, 96) and got.dtype == x.dtype
    torch.testing.assert_close(got.reshape(-1, 96), want, rtol=1e-2, atol=1e-2)  # bf16 output of _scaled_mm
    rel = (got - lin(x)).norm() / lin(x).norm()
    assert 1e-4 < rel < 0.08, rel  # fp8 is lossy, but close to the float layer


def test_fp8_linear_refuses_shapes_off_the_tensor_core_tiles():
    with pytest.raises(BadInputError, match="multiples of 16.*quantization='int8'"):
        Fp8Linear.from_linear(nn.Linear(100, 96))


def test_row_wise_fp8_needs_fp8_cores_and_a_torch_that_runs_them(monkeypatch):
    """Refused up front, with the fix: a card without fp8 cores, Hopper before torch 2.5, and Ada before 2.12, whose
    row-wise kernel ran outside the CUDA stream (graph capture, side streams)."""
    assert "8.9+" in rowwise_fp8_problem((8, 6), "2.13.0")
    assert "torch >= 2.5" in rowwise_fp8_problem((9, 0), "2.4.1")
    assert "torch >= 2.12" in rowwise_fp8_problem((8, 9), "2.11.0+cu128")
    assert rowwise_fp8_problem((8, 9), "2.12.0") is None and rowwise_fp8_problem((9, 0), "2.5.0") is None
    from onecard.quant.fp8 import check_fp8_device
    from onecard.train.precision import fp8_unavailable

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    monkeypatch.setattr(torch, "__version__", "2.11.0")
    with pytest.raises(BadInputError, match="RTX 4090: row-wise fp8 matmuls on Ada.*2.12.*quantization='int8'"):
        check_fp8_device(torch.device("cuda"))
    assert "torch >= 2.12" in fp8_unavailable("cuda", torchao=False)
    monkeypatch.setattr(torch, "__version__", "2.13.0")
    check_fp8_device(torch.device("cuda"))
    assert fp8_unavailable("cuda", torchao=False) is None


@pytest.mark.gpu
def test_quantize_rows_kernel_on_gpu_equals_the_reference():
    x = torch.randn(300, 11008, device="cuda", dtype=torch.bfloat16) * torch.logspace(-4, 4, 300, device="cuda")[:, None]
    q, s = quantize_rows_triton(x[:, :4096])  # strided rows
    ref_q, ref_s = quantize_rows_reference(x[:, :4096])
    assert torch.equal(s, ref_s) and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 5, 64, 2048])
def test_fp8_linear_on_gpu_computes_its_codes_and_scales(M):
    """The CUDA ``_scaled_mm`` (row-wise scales, fp8 tensor cores) against the same codes and scales in fp32."""
    torch.manual_seed(0)
    q = Fp8Linear.from_linear(nn.Linear(4096, 1024, bias=False)).cuda()
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    codes, scale = quantize_rows(x)
    a, w = codes.float() * scale, q.dequantized_weight().float()
    bound = 2 ** -7 * (a.abs() @ w.abs().t()) + 1e-3  # bf16 output rounding of terms up to |a| @ |w|
    assert ((q(x).float() - a @ w.t()).abs() <= bound).all()


@pytest.mark.gpu
def test_fp8_engine_on_gpu_costs_little_perplexity(tiny_model):
    """quantization='fp8' on the GPU (fast-accumulating _scaled_mm, the activation kernel; decode in CUDA graphs):
    the engine's model scores held-out text within 0.5 % of the bf16 engine's perplexity, and generates. (Logits
    are not compared with fp32 products: a bf16 difference upstream flips some activation codes by one e4m3 step,
    and on a random model those flips compound through the layers.)"""
    from onecard.bench.perplexity import sliding_window_perplexity
    from onecard.engine import LLM, SamplingParams
    from onecard.models import open_model_folder
    from onecard.quant.evaluate import text_ids
    from onecard.testing import local_corpus

    ids = text_ids(open_model_folder(tiny_model.path).load_tokenizer(), local_corpus().validation_text())
    ppl = {}
    for quantization in (None, "fp8"):
        llm = LLM(tiny_model.path, dtype="bfloat16", quantization=quantization, max_model_len=256, max_num_seqs=8,
                  gpu_memory_utilization=0.3)
        model = llm.engine.runner.model
        fn = lambda w: model.logits(w[0].cuda())[None]  # noqa: E731
        ppl[quantization] = sliding_window_perplexity(fn, ids, 256, 128, 2048).perplexity
        if quantization:
            assert sum(isinstance(m, Fp8Linear) for m in model.modules()) == 4 * model.args.num_layers
            outs = llm.generate(["def f(x):", "import os", "class A:", "x = 1"],
                                SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
            assert [len(o.outputs[0].token_ids) for o in outs] == [32] * 4
        del llm, model
    increase = ppl["fp8"] / ppl[None] - 1
    print(f"fp8 engine ppl increase on the GPU: {increase:+.4%} ({ppl})")
    assert abs(increase) <= 0.005, ppl
