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
