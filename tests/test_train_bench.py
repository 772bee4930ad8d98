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
