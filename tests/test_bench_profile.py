"""Profile breakdowns behind the bound claims: kernel/op times per kind, the adapter split, the decode bounds."""

import json
from collections import Counter

import pytest
import torch

from onecard.bench.kernel_profile import (MatmulCall, by_kind, kind_names, matmul_calls, minus, profile_events,
                                         time_per_name)


def test_by_kind_takes_the_first_matching_kind_and_keeps_every_kind():
    kinds = (("linears", r"gemv|aten::mm$"), ("norms", r"norm"))
    got = by_kind({"_wo_gemv_kernel": 5.0, "aten::mm": 2.0, "_add_rmsnorm_fwd": 1.5, "gemv_norm": 1.0,
                   "argmax": 0.5}, kinds)
    assert got == {"linears": 8.0, "norms": 1.5, "other": 0.5}
    assert by_kind({}, kinds) == {"linears": 0.0, "norms": 0.0, "other": 0.0}


def test_minus_is_per_step_and_keeps_only_the_long_runs_names():
    long, short = Counter({"decode": 90.0, "prefill": 12.0}), Counter({"prefill": 10.0, "warm": 3.0})
    assert minus(long, short, 1 / 2) == {"decode": 45.0, "prefill": 1.0}


def test_cpu_profile_sees_matmuls_with_their_shapes():
    x, w = torch.randn(8, 32), torch.randn(32, 16)
    events = profile_events(lambda: (x @ w).relu(), record_shapes=True)
    per_name = time_per_name(events)
    assert per_name["aten::mm"] > 0
    calls = matmul_calls(events)
    assert [(c.name, c.shapes) for c in calls] == [("aten::mm", ((8, 32), (32, 16)))]
    assert calls[0].us == pytest.approx(per_name["aten::mm"])


def test_adapter_split_goes_by_the_rank_sized_operand(benchmark_script):
    tv = benchmark_script("train_vs_hf")
    calls = [MatmulCall("aten::mm", ((8192, 4096), (4096, 16)), 20.0),        # x A^T
             MatmulCall("aten::addmm_", ((8192, 4096), (8192, 4096), (4096, 4096)), 400.0),  # base onto x A^T B^T
             MatmulCall("aten::mm", ((16, 8192), (8192, 4096)), 25.0),        # A's gradient
             MatmulCall("aten::mm", ((8192, 14336), (14336, 4096)), 900.0)]
    assert tv.adapter_split(calls) == (1300.0, 45.0)


def test_decode_bounds_swap_weights_and_attention_for_their_bytes(benchmark_script):
    qp = benchmark_script("quant_decode_profile")
    kinds = {"linears": 1800.0, "attention": 300.0, "norms": 120.0, "silu_up": 40.0, "other": 40.0}
    b = qp.bounds(kinds, ref_total_us=4900.0, weights_us=1200.0, kv_us=100.0)
    assert b["ideal_step_us_perfect_weights"] == 1200.0 + 500.0
    assert b["ideal_step_us_perfect_weights_and_kv"] == 1200.0 + 100.0 + 200.0
    assert b["max_speedup_perfect_weights"] == pytest.approx(4900 / 1700)
    assert b["max_speedup_perfect_weights_and_kv"] == pytest.approx(4900 / 1500)


def test_decode_profile_smoke_adds_up(benchmark_script, tmp_path, random_checkpoint):
    qp = benchmark_script("quant_decode_profile")
    r = qp.main(["--smoke", "--model", str(random_checkpoint("llama-2-7b")), "--out", str(tmp_path)])
    assert json.loads((tmp_path / "quant_decode_profile.json").read_text())["decode_steps"] == 4
    assert (tmp_path / "quant_decode_profile.png").stat().st_size > 0
    for arm in ("fp32", "int8", "int4"):
        for bs in (1, 4):
            parts = [r[f"{arm}_bs{bs}_{k}_us_per_step"] for k in qp.KIND_NAMES]
            assert sum(parts) == pytest.approx(r[f"{arm}_bs{bs}_total_us_per_step"])
            # matmul ops were classified as linears (0.0 exactly when none match). The value is a long run's CPU
            # time minus a short run's, over 4 steps on a busy CI core: its sign is noise, so it is not asserted
            assert r[f"{arm}_bs{bs}_linears_us_per_step"] != 0
    assert r["int4_bs1_target_speedup"] == 3.0 and r["int8_bs1_target_speedup"] == 1.8
    assert r["int4_bs1_max_speedup_perfect_weights"] == pytest.approx(
        r["fp32_bs1_total_us_per_step"] / r["int4_bs1_ideal_step_us_perfect_weights"])


def test_train_profile_smoke_adds_up(benchmark_script, tmp_path):
    tv = benchmark_script("train_vs_hf")
    tv.main(["--smoke", "--part", "profile", "--profile-batch-size", "2", "--out", str(tmp_path)])
    d = json.loads((tmp_path / "train_profile.json").read_text())
    kinds = kind_names(tv.PROFILE_KINDS)
    for name in ("hf_peft", "onecard"):
        assert sum(d[f"{name}_{k}_ms"] for k in kinds) == pytest.approx(d[f"{name}_kernel_ms"])
        assert d[f"{name}_matmuls_base_ms"] + d[f"{name}_matmuls_adapter_ms"] == pytest.approx(d[f"{name}_matmuls_ms"])
        assert d[f"{name}_matmuls_adapter_ms"] > 0  # both paths run rank-16 products
    assert d["speedup_if_only_base_matmuls_and_attention"] == pytest.approx(
        d["hf_peft_step_ms"] / (d["onecard_matmuls_base_ms"] + d["onecard_attention_ms"]))
    assert (tmp_path / "train_profile.png").stat().st_size > 0
