"""The engine benchmark library runs end to end on CPU (tiny model, tiny workload) and reports consistent numbers."""

from __future__ import annotations

import pytest

from onecard.bench.engine_bench import (EngineBenchConfig, lognormal_lengths, queued, results_table, run_engine_bench,
                                        workload)
from onecard.errors import BadInputError


pytestmark = pytest.mark.usefixtures("one_thread")


def test_lognormal_lengths_are_seeded_and_centered():
    a = lognormal_lengths(4000, 256, 0.6, 0, 1, 100_000)
    assert a == lognormal_lengths(4000, 256, 0.6, 0, 1, 100_000)
    assert 240 < sum(a) / len(a) < 272


def test_bench_smoke_cpu(random_checkpoint):
    cfg = EngineBenchConfig(random_checkpoint("llama-2-7b"), dtype="float32", device="cpu", num_prompts=6, mean_input=12,
                            mean_output=6, max_model_len=128, decode_prompt_len=8, decode_tokens=6, hf_prompts=2,
                            hf_batch=2, memory_cap_gib=None, max_num_seqs=4, run_hf_static=False)
    r = run_engine_bench(cfg)
    assert r["engine_offline_output_tokens"] == sum(lognormal_lengths(6, 6, 0.6, 1, 2, 64))
    assert r["engine_bs1_tok_s"] > 0 and r["hf_eager_bs1_tok_s"] > 0 and r["measured_copy_bandwidth_gbs"] > 0
    assert 0 < r["engine_bs1_roofline_fraction"] == pytest.approx(r["engine_bs1_tok_s"] / r["bs1_roofline_tok_s"])
    assert 0 <= r["engine_offline_kv_waste_pct"] < 100
    assert r["hf_batched_extrapolated"] is True and r["hf_batched_prompts"] == 2
    assert r["engine_offline_order"] == "longest_first" == r["config_offline_order"]
    assert r["offline_speedup_vs_hf_batched"] == pytest.approx(r["engine_offline_output_tok_s"] / r["hf_batched_useful_tok_s"])
    results_table(r)


def test_bench_config_rejects_bad_values():
    with pytest.raises(BadInputError, match="max_model_len"):
        EngineBenchConfig("x", decode_prompt_len=2000, decode_tokens=256, max_model_len=2048)


def test_subsets_are_drawn_then_queued_longest_output_first():
    cfg = EngineBenchConfig("x", num_prompts=50, mean_input=8, mean_output=32, max_model_len=256, decode_prompt_len=8,
                            decode_tokens=8)
    reqs = workload(cfg, 100)
    sub = reqs[:10]  # HF's subset: a sample of the drawn workload, not its 10 longest outputs
    q = queued(sub, "longest_first")
    assert sorted(map(id, q)) == sorted(map(id, sub))
    assert [o for _, o in q] == sorted((o for _, o in sub), reverse=True)
    assert queued(sub, "submitted") is sub
    with pytest.raises(BadInputError, match="offline_order"):
        EngineBenchConfig("x", offline_order="shortest")
