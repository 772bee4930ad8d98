"""Quantization quality on the project's tiny trained model (fixture ``tiny_model``): sliding-window perplexity.

What the tiny model can show honestly (measured, not assumed): it is small and
under-trained (val ppl ~240-290), so int4 with groups barely moves its
perplexity (RTN g64: ~0.0%) and the issue's "GPTQ/AWQ <= 0.6x RTN at g128" is
noise here. Per-channel int4 (one scale per output row) does cost RTN
something, and GPTQ must recover it; int8 must be free. The larger-model
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


@pytest.mark.slow
def test_gptq_recovers_per_channel_int4_loss(setup, tmp_path):
    from onecard.quant import QuantConfig, load_quantized_hf, quantize_model_folder

    path, _, ppl, base = setup
    inc = {}
    for method in ("rtn", "gptq"):
        cfg = QuantConfig(method, 4, -1, sym=False, nsamples=16, seqlen=256)
        rep = quantize_model_folder(path, tmp_path / method, cfg, progress=False)
        inc[method] = ppl(load_quantized_hf(rep.out_dir)) / base - 1
    print(f"per-channel int4 ppl increase: {inc}")
    assert inc["rtn"] > 0, inc                      # per-channel int4 costs RTN something...
    assert inc["gptq"] <= 0.6 * inc["rtn"], inc      # ...and GPTQ recovers at least 40% of it


@pytest.mark.slow
def test_awq_int4_keeps_quality(setup, tmp_path):
    from onecard.quant import QuantConfig, load_quantized_hf, quantize_model_folder

    path, _, ppl, base = setup
    rep = quantize_model_folder(path, tmp_path / "awq", QuantConfig("awq", 4, 64, nsamples=8, seqlen=256), progress=False)
    increase = ppl(load_quantized_hf(rep.out_dir)) / base - 1
    print(f"AWQ int4 g64 ppl increase: {increase:+.5f}")
    assert abs(increase) <= 0.01, increase
