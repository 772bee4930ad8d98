"""The decode step-time model (bs=1 fit, batch factors): the fit, and its predictions against onecard's committed
measurements."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from onecard.bench.results import RESULTS_DIR
from onecard.errors import BadInputError
from onecard.hardware import find_gpu
from onecard.models import arch_config
from onecard.plan import memory as M
from onecard.plan import plan_inference
from onecard.plan.calibration import PACKAGED, decode_calibration, decode_model, load_results, measurements
from onecard.plan.decode_fit import (DecodeModel, DecodeObservation, batch_observations_from_results,
                                     fit_batch_factors, fit_decode_model, leave_one_out, lower_bounded_lstsq,
                                     observations_from_results, step_bytes)
from onecard.plan.spec import resolve_model, spec_from_config

TARGET = 0.15  # issue 9: bs=1 decode tok/s within 15 % of measured


def test_lower_bounded_lstsq_pins_only_what_crosses_its_bound():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x = lower_bounded_lstsq(a, a @ np.array([2.0, 3.0]), np.array([0.0, 0.0]))
    assert x == pytest.approx([2.0, 3.0])  # interior: the plain least-squares answer
    x = lower_bounded_lstsq(a, a @ np.array([2.0, -1.0]), np.array([0.0, 0.0]))
    assert x[1] == 0.0 and x[0] > 0  # the second would go negative: pinned at its bound, the first refitted


def _synthetic(model: DecodeModel) -> list[DecodeObservation]:
    out = []
    for arch, layers in (("llama-2-7b", 8), ("llama-2-7b", 32), ("llama-3-8b", 8), ("qwen2-7b", 8)):
        cfg = arch_config(arch)
        cfg["num_hidden_layers"] = layers
        cfg.pop("_onecard_source", None)
        spec = spec_from_config(cfg, arch)
        for card in ("h100", "h200"):
            gpu = find_gpu(card)
            for fmt in ("bf16", "int8", "int4"):
                b = step_bytes(spec, fmt, 256, M.kv_bytes_per_token(spec))
                tok_s = 1.0 / model.step_seconds(b, gpu.bandwidth_gbs, fmt)
                out.append(DecodeObservation("synthetic", f"{arch}{layers}{card}{fmt}", gpu.key, gpu.bandwidth_gbs, fmt,
                                             b, tok_s))
    return out


def test_fit_recovers_the_constants_it_was_made_from():
    truth = DecodeModel({"bf16": 0.8, "int8": 0.6, "int4": 0.35}, 50e-6, 300e-6, 0, ())
    fitted = fit_decode_model(_synthetic(truth))
    for fmt, eff in truth.efficiency.items():
        assert fitted.efficiency[fmt] == pytest.approx(eff, rel=1e-6)
    assert fitted.per_layer_s == pytest.approx(50e-6, rel=1e-6) and fitted.per_step_s == pytest.approx(300e-6, rel=1e-6)


def test_fit_needs_two_depths_and_bf16():
    obs = _synthetic(DecodeModel({"bf16": 0.8, "int8": 0.6, "int4": 0.35}, 50e-6, 300e-6, 0, ()))
    with pytest.raises(BadInputError, match="two model depths"):
        fit_decode_model([o for o in obs if o.bytes.layers == 8])
    with pytest.raises(BadInputError, match="bf16"):
        fit_decode_model([o for o in obs if o.fmt != "bf16"])


def test_benchmark_files_are_read_by_their_keys():
    results = {
        "a.json": {"gpu": "NVIDIA H200", "configs": [
            {"arch": "llama-2-7b", "layers": 8, "weight_format": "int4", "measured_decode_tok_s": 900.0},
            {"arch": "llama-2-7b", "layers": 8, "path": "train-lora", "measured_gib": 5.0}]},
        "b.json": {"gpu": "NVIDIA H100 80GB HBM3", "model": "/c/random-fast-llama-3-8b-full-bfloat16-s0-abc", "prompt_len": 128,
                   "decode_tokens": 64, "bf16_bs1_tok_s": 150.0, "int4-tinygemm_bs1_tok_s": 300.0},
        "c.json": {"gpu": "Some Unknown GPU", "bf16_bs1_tok_s": 1.0, "model": "random-llama-2-7b-full-bfloat16-s0-x"},
        "d.json": {"gpu": "NVIDIA H200", "device": "cpu", "configs": [
            {"arch": "llama-2-7b", "layers": 2, "weight_format": "bf16", "measured_decode_tok_s": 9.0}]},
    }
    obs = observations_from_results(results)
    assert [(o.source, o.fmt, o.card, o.bytes.layers) for o in obs] == [("a.json", "int4", "h200", 8),
                                                                         ("b.json", "bf16", "h100-sxm", 32)]
    spec = resolve_model("llama-3-8b")
    assert obs[1].bytes == step_bytes(spec, "bf16", 128 + 32, M.kv_bytes_per_token(spec))


def _committed():
    return observations_from_results(load_results(str(RESULTS_DIR)))


def test_committed_runs_cover_depths_formats_and_architectures():
    """Depths pin the per-layer latency apart from the per-step one, formats their efficiencies. (All runs are on
    H200s since the H100 engine_vs_hf run of an older engine was replaced: docs/planner.md says so.)"""
    obs = _committed()
    assert {o.bytes.layers for o in obs} >= {8, 32}
    assert {o.fmt for o in obs} >= {"bf16", "int4"}
    assert len({o.group.split(":")[1] for o in obs if o.group.count(":") == 3}) >= 3


def test_leave_one_run_out_predicts_every_committed_bs1_speed_within_target():
    """Each measured run is predicted by the model fitted without it (its repeats left out too). A run whose weight
    format no other run measured would have nothing left to fit that format's efficiency from, so it would not be
    predicted here (int8 was, until quant_decode_llama-3-8b.json measured it a second time)."""
    obs = _committed()
    seen_elsewhere = {o.group for o in obs if any(p.fmt == o.fmt and p.group != o.group for p in obs)}
    errors = {f"{o.group}": pred / o.tok_s - 1 for o, pred in leave_one_out(obs) if o.group in seen_elsewhere}
    assert {o.group for o in obs} == seen_elsewhere  # every run is predicted
    worst = max(errors, key=lambda k: abs(errors[k]))
    assert abs(errors[worst]) <= TARGET, f"{worst}: {errors[worst]:+.1%}"


def test_fitted_constants_are_physical():
    model = fit_decode_model(_committed())
    assert all(0 < e <= 1 for e in model.efficiency.values())
    assert model.per_layer_s >= 0 and model.per_step_s >= 0


def test_plan_bs1_is_the_fitted_step_time():
    spec = resolve_model("llama-2-7b")
    p = plan_inference(spec, "h100", bits=4, max_model_len=512)
    cal = decode_calibration("int4")
    b = step_bytes(spec, "int4", 256, M.kv_bytes_per_token(spec))
    assert p.decode_tok_s_bs1 == pytest.approx(1.0 / cal.model.step_seconds(b, find_gpu("h100").bandwidth_gbs, "int4"))
    assert p.efficiency == cal.efficiency and "per layer" in p.efficiency_source
    # a caller's efficiency replaces the format's own and keeps the fitted latencies
    slow = plan_inference(spec, "h100", bits=4, max_model_len=512, decode_efficiency=cal.efficiency / 2)
    assert slow.decode_tok_s_bs1 < p.decode_tok_s_bs1 and slow.efficiency == pytest.approx(cal.efficiency / 2)


def test_packaged_measurements_are_those_in_docs_results():
    """An install without this repository's docs/ (a wheel, a git URL) plans from the copy packaged beside the
    calibration module, so it must hold what docs/results holds now."""
    assert PACKAGED.exists()
    assert measurements() == measurements(RESULTS_DIR), (
        "src/onecard/plan/measurements.json differs from docs/results: run "
        "python -c 'from onecard.plan.calibration import write_packaged; write_packaged()'")
    assert {o.source for o in _committed()} == set(measurements())


def test_batch_factor_is_linear_between_measured_batches_and_flat_beyond():
    model = DecodeModel({"bf16": 0.9}, 0.0, 0.0, 1, ("x",), {"int4": ((4, 2.0), (16, 3.0))})
    assert model.batch_factor("int4", 1) == 1.0
    assert model.batch_factor("int4", 2) == pytest.approx(1 + 1 / 3)
    assert model.batch_factor("int4", 10) == pytest.approx(2.5)
    assert model.batch_factor("int4", 64) == 3.0
    assert model.batch_factor("int8", 8) == 1.0  # nothing measured batched for it or bf16: bytes alone
    assert replace(model, batch_factors={"bf16": ((2, 1.5),)}).batch_factor("int8", 2) == 1.5  # reads like bf16


def test_batched_steps_are_read_by_their_keys():
    results = {"q.json": {"gpu": "NVIDIA H200", "model": "/c/random-fast-llama-2-7b-full-bfloat16-s0-abc",
                          "prompt_len": 128, "decode_tokens": 64, "int4_bs16_ms_per_step": 4.0,
                          "int4_bs1_ms_per_token": 2.0, "fp8_bs16_ms_per_step": 4.0, "int4_bs16_tok_s": 4000.0},
               "other.json": {"gpu": "Some Unknown GPU", "model": "random-llama-2-7b-full-bfloat16-s0-x",
                              "bf16_bs8_ms_per_step": 3.0}}
    obs = batch_observations_from_results(results)
    assert [(o.source, o.fmt, o.batch, o.step_s) for o in obs] == [("q.json", "int4", 16, 0.004)]
    spec = resolve_model("llama-2-7b")
    assert obs[0].bytes == step_bytes(spec, "int4", 160, M.kv_bytes_per_token(spec), 16)


def _batched():
    return batch_observations_from_results(load_results(str(RESULTS_DIR)))


def test_committed_batched_runs_cover_each_fitted_format_up_to_64_sequences():
    obs = _batched()
    assert {o.fmt for o in obs} == {"bf16", "int8", "int4"} and max(o.batch for o in obs) >= 64
    assert set(decode_model(str(RESULTS_DIR)).batch_factors) == {"bf16", "int8", "int4"}


def test_each_models_batched_steps_from_the_other_models_factors():
    """Llama-2-7B's batched steps (quant_decode.json) from Llama-3-8B's factors (quant_decode_llama-3-8b.json) and
    the reverse: every step within 30 % (the regimes change between measured batches: GEMV, cuBLAS or dot_t, the
    dequantize path from 65 rows), the mean error under 12 %, and at most half that of bytes alone, which has
    every quantized batch too fast (int4 at 64 sequences by 64-69 %)."""
    model, obs = decode_model(str(RESULTS_DIR)), _batched()
    assert len({o.source for o in obs}) >= 2
    for source in {o.source for o in obs}:
        held = replace(model, batch_factors=fit_batch_factors(model, [o for o in obs if o.source != source]))
        bytes_alone = replace(model, batch_factors={})
        errors = {(o.fmt, o.batch): [m.step_seconds(o.bytes, o.bandwidth_gbs, o.fmt, o.batch) / o.step_s - 1
                                     for m in (held, bytes_alone)] for o in obs if o.source == source}
        worst = max(errors, key=lambda k: abs(errors[k][0]))
        assert abs(errors[worst][0]) <= 0.30, f"{source} {worst}: {errors[worst][0]:+.1%}"
        mean_held, mean_bytes = (float(np.mean([abs(e[i]) for e in errors.values()])) for i in (0, 1))
        assert mean_held <= 0.12 and mean_held <= mean_bytes / 2, f"{source}: {mean_held:.1%} vs {mean_bytes:.1%}"


def test_batch_factors_of_one_card_predict_another_cards_batched_step():
    """The factors come from the H200's runs; the H100's run (docs/results/h100, not in the fit) has 16-sequence
    steps. Per format, its bs=16 step over its bs=1 step is predicted within 5 % (bf16 1.31x, int8 1.60x measured).
    Not int4: that run (d90d0ee) predates kernels.wo_mma, which has served int4 at 2-64 sequences since fd2123a, so
    its int4 step and the H200 fit's are different kernels (1.99x measured there, 1.64x predicted from the fit).
    int8 moved to wo_mma at 7a1cc06 at bs=1 and bs=16 alike, and its ratio still holds (1.62x predicted). Absolute
    speeds on another card carry the bs=1 fit's own cross-card error (docs/planner.md)."""
    model = decode_model(str(RESULTS_DIR))
    h100 = {"h100/quant_decode.json": load_results(str(RESULTS_DIR / "h100"))["quant_decode.json"]}
    bs1 = {o.fmt: o for o in observations_from_results(h100)}
    batched = batch_observations_from_results(h100)
    assert {o.fmt for o in batched} == {"bf16", "int8", "int4"}
    for o in (o for o in batched if o.fmt != "int4"):
        one = bs1[o.fmt]
        predicted = (model.step_seconds(o.bytes, o.bandwidth_gbs, o.fmt, o.batch)
                     / model.step_seconds(one.bytes, one.bandwidth_gbs, o.fmt))
        measured = o.step_s * one.tok_s
        assert abs(predicted / measured - 1) <= 0.05, f"{o.fmt} bs={o.batch}: {predicted:.3f}x vs {measured:.3f}x"
