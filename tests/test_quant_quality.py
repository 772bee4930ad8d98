"""Quantization quality on the project's tiny trained model (fixture ``tiny_model``): sliding-window perplexity.

What the tiny model can show honestly (measured, not assumed): it is small and
under-trained (val ppl ~240-290), so int4 with groups barely moves its
perplexity (RTN g64: ~0.0%) and the issue's "GPTQ/AWQ <= 0.6x RTN at g128" is
noise here; even per-channel int4 (one scale per output row) moves it by only
~0.03-0.1%, so GPTQ must do no worse than RTN there; int8 must be free. The larger-model
version of the group-128 comparison is ``benchmarks/quant_quality.py`` (GPU).
"""

from __future__ import annotations

import copy

import pytest
import torch

CONTEXT, STRIDE, TOKENS = 256, 128, 2048


@pytest.fixture(scope="module")
def setup(tiny_model):
    from onecard.bench.perplexity import hf_logits_fn, sliding_window_perplexity
    from onecard.quant.evaluate import load_for_eval, text_ids
    from onecard.testing import local_corpus

    folder, ref = load_for_eval(tiny_model.path, "cpu", torch.float32)
    ids = text_ids(folder.load_tokenizer(), local_corpus().validation_text())

    def ppl(model) -> float:
        return sliding_window_perplexity(hf_logits_fn(model), ids, CONTEXT, STRIDE, TOKENS).perplexity

    return tiny_model.path, ref, ppl, ppl(ref)


def test_int8_rtn_is_free(setup):
    from onecard.quant import quantize_model_

    _, ref, ppl, base = setup
    increase = ppl(quantize_model_(copy.deepcopy(ref), "int8")) / base - 1
    assert abs(increase) <= 0.005, increase


def test_fp8_weights_and_activations_cost_little(setup):
    """e4m3 keeps 3 mantissa bits (int8 keeps ~7), on the activations too: it is not free like int8, but a
    per-channel weight scale and a per-token activation scale keep it well under int4's cost."""
    from onecard.quant import Fp8Linear, quantize_model_

    _, ref, ppl, base = setup
    model = quantize_model_(copy.deepcopy(ref), "fp8")
    assert any(isinstance(m, Fp8Linear) for m in model.modules())
    increase = ppl(model) / base - 1
    print(f"fp8 ppl increase: {increase:+.4%}")  # +0.05 % on this machine
    assert abs(increase) <= 0.005, increase


@pytest.mark.slow
def test_gptq_per_channel_int4_no_worse_than_rtn(setup, tmp_path):
    from onecard.quant import QuantConfig, load_quantized_hf, quantize_model_folder

    path, _, ppl, base = setup
    inc = {}
    for method in ("rtn", "gptq"):
        cfg = QuantConfig(method, 4, -1, sym=False, nsamples=16, seqlen=256)
        rep = quantize_model_folder(path, tmp_path / method, cfg, progress=False)
        inc[method] = ppl(load_quantized_hf(rep.out_dir)) / base - 1
    print(f"per-channel int4 ppl increase: {inc}")
    # At this size the increases are near noise (+0.11% / -0.04% on one machine, +0.03% / +0.03% on another):
    # GPTQ must be no worse than RTN and both small; GPTQ's own objective is tested in test_quant_pipeline.py.
    assert inc["gptq"] <= inc["rtn"] + 1e-4, inc
    assert max(abs(v) for v in inc.values()) < 0.01, inc


@pytest.mark.slow
def test_awq_int4_keeps_quality(setup, tmp_path):
    from onecard.quant import QuantConfig, load_quantized_hf, quantize_model_folder

    path, _, ppl, base = setup
    rep = quantize_model_folder(path, tmp_path / "awq", QuantConfig("awq", 4, 64, nsamples=8, seqlen=256), progress=False)
    increase = ppl(load_quantized_hf(rep.out_dir)) / base - 1
    print(f"AWQ int4 g64 ppl increase: {increase:+.5f}")
    assert abs(increase) <= 0.01, increase


@pytest.mark.slow
def test_awq_protects_channels_of_large_activations(setup, tmp_path):
    """What AWQ is for, which the models trained here lack: a few hidden channels whose activations are much larger
    than the rest. Put in without changing the float model (``with_outlier_channels``: norm weights x64 on 8
    channels, the reading linears' columns /64), they make RTN's rounding of those columns count 64 times over;
    AWQ's scales must take most of that back. One machine: RTN +0.96 %, AWQ +0.08 % (0.08x), GPTQ +0.46 %; on the
    unchanged model RTN +0.15 % and AWQ 0.96x of it."""
    from onecard.quant import QuantConfig, load_quantized_hf, quantize_model_folder
    from onecard.quant.evaluate import load_for_eval
    from onecard.testing.outliers import with_outlier_channels

    path, _, ppl, base = setup
    src = with_outlier_channels(path, tmp_path / "outliers", channels=8, factor=64.0)
    assert ppl(load_for_eval(src, "cpu", torch.float32)[1]) == base  # power-of-two rescaling: the same function, bit for bit
    inc = {}
    for method in ("rtn", "awq"):
        cfg = QuantConfig(method, 4, 128, sym=False, nsamples=16, seqlen=256)
        rep = quantize_model_folder(src, tmp_path / method, cfg, progress=False)
        inc[method] = ppl(load_quantized_hf(rep.out_dir)) / base - 1
    print(f"outlier channels, int4 g128 ppl increase: {inc}")
    assert inc["rtn"] > 0.004, inc  # the outliers do hurt RTN (+0.15 % without them)
    assert inc["awq"] <= 0.3 * inc["rtn"], inc


def test_quality_benchmark_pools_ratios_over_trainings(benchmark_script):
    """Several trainings' ratios are pooled as mean increase over mean RTN increase, so one training where RTN
    barely hurts cannot dominate (a mean of per-training ratios would be 4.6x here, the pool 1.0x)."""
    qq = benchmark_script("quant_quality")
    runs = [{"seed": 0, "float_ppl": 30.0, "int4_rtn_increase_pct": 1.0, "int4_awq_increase_pct": 0.2},
            {"seed": 1, "float_ppl": 31.0, "int4_rtn_increase_pct": 0.1, "int4_awq_increase_pct": 0.9}]
    out = qq.pooled(runs, ["int4_rtn", "int4_awq"])
    assert out["int4_awq_increase_pct_mean"] == pytest.approx(0.55)
    assert out["int4_awq_increase_vs_rtn"] == pytest.approx(1.0)
    assert out["int4_awq_increase_vs_rtn_per_seed"] == pytest.approx([0.2, 9.0])
    assert out["int4_awq_seeds_at_or_under_0_6x_rtn"] == 1
    assert out["target_awq_le_0_6x_rtn"] is False
    assert "target_gptq_le_0_6x_rtn" not in out  # an arm not run has no verdict
    runs[1]["int4_awq_increase_pct"] = 0.0
    assert qq.pooled(runs, ["int4_rtn", "int4_awq"])["target_awq_le_0_6x_rtn"] is True
