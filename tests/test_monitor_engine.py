"""Engine hook on the real onecard engine (tiny random Llama, CPU) and the guard's engine back-off."""

from __future__ import annotations

from onecard.monitor.engine_hook import engine_backoff, watch_engine
from onecard.monitor.guard import GuardPolicy, ThermalGuard
from onecard.monitor.monitor import Monitor
from onecard.monitor.nvml import GPUSample


class NoGPU:
    def read(self):
        return []

    def close(self):
        pass


def test_engine_steps_and_requests_are_recorded_and_backoff_halves_max_num_seqs(random_checkpoint, tmp_path):
    from onecard.engine import LLM, SamplingParams

    llm = LLM(random_checkpoint("llama-2-7b"), max_model_len=64, max_num_seqs=8, block_size=8)
    mon = Monitor(reader=NoGPU(), log=tmp_path / "e.jsonl", attach=False)
    unwatch = watch_engine(mon, llm.engine)
    outs = llm.generate(["a b c", "d e f g", "h"], SamplingParams(max_tokens=6, ignore_eos=True, temperature=0))
    unwatch()
    recs = list(mon.records)
    steps = [r for r in recs if "step_time" in r]
    done = [r for r in recs if "ttft" in r]
    generated = sum(len(c.token_ids) for o in outs for c in o.outputs)
    assert sum(r["tokens"] for r in steps) == generated == 18
    assert max(r["batch_size"] for r in steps) == 3
    assert all(0 <= r["kv_use"] <= 1 for r in steps) and steps[0]["kv_use"] > 0 and steps[-1]["kv_use"] == 0  # freed at the end
    assert any("itl" in r for r in steps)  # decode steps carry inter-token latency
    assert len(done) == 3 and all(0 < r["ttft"] <= r["latency"] for r in done)
    # thermal back-off acts on the live scheduler knob and restores it
    guard = ThermalGuard(GuardPolicy(hot_for_s=0, cool_for_s=0), target=engine_backoff(llm.engine))
    hot, cool = [GPUSample(0, "g", temp_c=90.0)], [GPUSample(0, "g", temp_c=60.0)]
    guard.observe(0.0, hot)
    assert llm.engine.scheduler.max_num_seqs == 4
    guard.observe(1.0, cool)
    assert llm.engine.scheduler.max_num_seqs == 8
