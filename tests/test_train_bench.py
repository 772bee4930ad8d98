"""benchmarks/train_vs_hf.py's longest-sequence search: galloping from the planner's guess, then bisection."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def bench(benchmark_script):
    return benchmark_script("train_vs_hf")


@pytest.mark.parametrize("true", [100_000, 28_000, 5_000, 262_144, 1_000])
def test_search_finds_the_longest_multiple_that_fits(bench, true):
    calls = []

    def ok(n):
        calls.append(n)
        return n <= true

    good, bad = bench.search_longest(ok, 98_304, 4096, 262_144, lambda: True)
    want = min(true // 4096 * 4096, 262_144) or None
    assert good == want and (bad is None or bad - (good or 0) <= 4096) and len(calls) <= 12


def test_search_stops_when_the_budget_runs_out(bench):
    calls = []
    good, bad = bench.search_longest(lambda n: calls.append(n) or n <= 50_000, 4096, 4096, 262_144,
                                     lambda: len(calls) < 3)
    assert calls == [4096, 8192, 16384] and good == 16384 and bad is None  # a lower bound, said so in the JSON


def test_flops_count_recomputation_and_utilization_follows(bench):
    flops = bench._flops_per_token(False, 2048)  # Llama-3-8B, seq 2048
    # model FLOPs: forward + input-grad backward, ~2 x 15.5 GFLOP; onecard recomputes all but the down projection,
    # HF the whole layer
    assert 30e9 < flops["model"] < 32e9 and flops["model"] < flops["onecard"] < flops["hf"]
    assert flops["hf"] - flops["onecard"] == pytest.approx(2 * 32 * 4096 * 14336)
    u = bench._utilization(8000.0, 12000.0, flops, 800.0)
    assert u["onecard_mfu"] == pytest.approx(12000 * flops["model"] / 800e12)
    assert u["onecard_mfu"] / u["hf_mfu"] == pytest.approx(1.5)
    assert u["speedup_ceiling_vs_hf"] == pytest.approx(800e12 / flops["onecard"] / 8000)
    assert u["fraction_of_peak_needed_for_2x"] == pytest.approx(2 / u["speedup_ceiling_vs_hf"])
    assert all(v is None for v in bench._utilization(8000.0, 12000.0, flops, None).values())


def test_qlora_ctx_smoke_writes_its_result(bench, tmp_path):
    """The --part qlora-ctx path end to end at smoke sizes (CPU): the search runs and the JSON is written."""
    import json

    bench.main(["--smoke", "--part", "qlora-ctx", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "train_qlora_ctx.json").read_text())
    assert data["max_trainable_tokens"] and data["trials"]


def test_qlora_bases_smoke_writes_its_result(bench, tmp_path):
    """The --part qlora-bases path end to end at smoke sizes (CPU): three bases timed, ratios against HF's NF4."""
    import json

    pytest.importorskip("bitsandbytes")
    bench.main(["--smoke", "--part", "qlora-bases", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "train_qlora_bases.json").read_text())
    assert all(data[f"{arm}_tokens_per_s"] > 0 for arm in ("hf_nf4", "onecard_nf4", "onecard_int4"))
    assert data["onecard_int4_speedup_vs_hf_nf4"] == pytest.approx(
        data["onecard_int4_tokens_per_s"] / data["hf_nf4_tokens_per_s"])
    assert (tmp_path / "train_qlora_bases.png").exists()


def test_card_columns_read_the_monitor_summary(bench):
    """Clock, power and power-cap share per path come from the monitor's summary of the GPU the step ran on, and
    the ratios follow; a path with no NVML reading gives None, never a zero."""
    def summary(mhz, watts, capped_s):
        return {"duration_s": 2.0, "gpu1_sm_clock_mean_mhz": mhz, "gpu1_power_mean_w": watts,
                "gpu1_power_limit_w": 700.0, "gpu1_throttle_s_sw_power_cap": capped_s, "gpu1_slowdown_fraction": 0.5,
                "gpu0_sm_clock_mean_mhz": 9999.0}

    hf = {"tokens_per_s": 7000.0, **bench._card_state(summary(1900.0, 640.0, 1.0), 1)}
    ours = {"tokens_per_s": 12600.0, **bench._card_state(summary(1520.0, 700.0, 2.0), 1)}
    assert hf["sm_clock_mean_mhz"] == 1900.0 and hf["power_capped_fraction"] == 0.5
    assert ours["power_capped_fraction"] == 1.0
    cols = bench._card_columns(hf, ours)
    assert cols["onecard_clock_ratio_vs_hf"] == pytest.approx(0.8) and cols["power_limit_w"] == 700.0
    assert cols["onecard_tokens_per_joule"] == pytest.approx(18.0) and cols["hf_tokens_per_joule"] == pytest.approx(
        7000 / 640)
    assert cols["energy_ratio_vs_hf"] == pytest.approx((7000 / 640) / 18.0)
    blank = bench._card_columns({"tokens_per_s": 7000.0, **bench._card_state({"duration_s": 2.0}, 0)},
                                {"oom": True, "tokens_per_s": None})
    assert blank["onecard_clock_ratio_vs_hf"] is None and blank["hf_tokens_per_joule"] is None
    assert blank["hf_power_capped_fraction"] is None and blank["energy_ratio_vs_hf"] is None
    free = bench._card_state({"duration_s": 2.0, "gpu0_slowdown_fraction": 0.0, "gpu0_power_mean_w": 300.0}, 0)
    assert free["power_capped_fraction"] == 0.0  # sampled, never capped


def test_nvml_index_follows_the_uuid_not_torchs_numbering(bench):
    """Under CUDA_VISIBLE_DEVICES=2 torch's device 0 is NVML's GPU 2: the monitor must read that one."""
    uuids = {0: "GPU-aaaa-0000", 1: None, 2: "GPU-cccc-2222"}
    assert bench.nvml_index(uuids, "cccc-2222", 0) == 2
    assert bench.nvml_index(uuids, "ffff-9999", 0) == 0 and bench.nvml_index(uuids, "", 1) == 1
