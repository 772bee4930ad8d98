"""Async scheduling (host prepares step t+1 while step t runs) changes nothing a caller can see, on CPU.

The CPU path runs the same engine code as CUDA: step t+1's inputs take step t's
tokens from the device buffer while the host still holds placeholders, and the
host reads step t's tokens only after launching step t+1.
"""

from __future__ import annotations

import pytest
import torch

from onecard.engine import LLM, SamplingParams
from onecard.engine.config import EngineConfig
from onecard.engine.model_runner import take_previous
from onecard.engine.sequence import PLACEHOLDER
from onecard.errors import NotBuiltYetError

PROMPTS = ["def read_config(path):\n", "import os\nimport sys\n", "class Parser:", "for i in range(10):",
           "The quick brown fox", "x = [1, 2, 3]\n"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama_path(random_checkpoint):
    return random_checkpoint("llama-2-7b")


@pytest.fixture(scope="module")
def pair(llama_path):
    """The same engine twice: async scheduling off (the reference) and on."""
    kw = {"max_model_len": 128, "max_num_seqs": 8, "block_size": 8}
    return LLM(llama_path, async_scheduling=False, **kw), LLM(llama_path, async_scheduling=True, **kw)


def _view(outs):
    return [[(c.token_ids, c.text, c.finish_reason, c.logprobs) for c in o.outputs] for o in outs]


def _assert_clean(llm):
    bm = llm.engine.block_manager
    assert llm.stats()["kv_blocks_used"] == 0 and not bm.used_block_ids
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting


def test_overlap_is_what_runs(pair):
    """The async engine launches decode steps whose input tokens come from the previous step on the device."""
    _, on = pair
    assert on.engine.overlap and not pair[0].engine.overlap
    carried = []
    launch = on.engine.runner.launch_decode

    def spy(seqs, prev_rows):
        carried.append(sum(r >= 0 for r in prev_rows))
        assert all((r >= 0) == (s.token_ids[-1] == PLACEHOLDER) for s, r in zip(seqs, prev_rows))
        return launch(seqs, prev_rows)

    on.engine.runner.launch_decode = spy
    try:
        on.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    finally:
        del on.engine.runner.launch_decode
    assert len(carried) >= 10 and sum(c > 0 for c in carried) >= 9
    _assert_clean(on)


def test_greedy_mixed_batch_identical(pair):
    """Requests that finish at different steps (max_tokens, stop token ids, stop strings), n>1, logprobs."""
    off, on = pair
    base = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = off.generate(PROMPTS, base, use_tqdm=False)
    toks, text = full[0].outputs[0].token_ids, full[1].outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[toks[6]]),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stop),
              SamplingParams(temperature=0, max_tokens=17, ignore_eos=True, n=2, logprobs=3),
              SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)]
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], *PROMPTS[3:]]
    want = off.generate(prompts, params, use_tqdm=False)
    got = on.generate(prompts, params, use_tqdm=False)
    assert _view(got) == _view(want)
    assert want[1].outputs[0].finish_reason == "stop" and want[1].outputs[0].token_ids[-1] == toks[6]
    assert want[2].outputs[0].finish_reason == "stop"
    assert [len(c.token_ids) for o in got for c in o.outputs] == [5, toks.index(toks[6]) + 1, len(want[2].outputs[0].token_ids), 17, 17, 1, 9]
    _assert_clean(on)


def test_bs1_and_eos_identical(pair):
    off, on = pair
    sp = SamplingParams(temperature=0, max_tokens=40)  # EOS may end it early: the lagged stop check must match
    assert _view(on.generate(PROMPTS[2], sp, use_tqdm=False)) == _view(off.generate(PROMPTS[2], sp, use_tqdm=False))
    _assert_clean(on)


def test_seeded_sampling_and_penalties_identical(pair):
    """Seeded draws use per-request generators (same draws either way); penalized requests overlap too, their
    in-flight token counted on the device, and decode exactly as without async scheduling."""
    off, on = pair
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=7, max_tokens=15, ignore_eos=True),
              SamplingParams(temperature=1.0, min_p=0.05, seed=3, max_tokens=11, ignore_eos=True, n=2),
              SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5, max_tokens=13, ignore_eos=True)]
    prompts = PROMPTS[:3]
    assert _view(on.generate(prompts, params, use_tqdm=False)) == _view(off.generate(prompts, params, use_tqdm=False))
    penalized = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, frequency_penalty=0.6),
                 SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.4, logprobs=2),
                 SamplingParams(temperature=0.9, seed=11, max_tokens=24, ignore_eos=True, presence_penalty=0.8)]
    carried = []
    launch = on.engine.runner.launch_decode

    def spy(seqs, prev_rows):
        carried.append(sum(r >= 0 for r in prev_rows))
        return launch(seqs, prev_rows)

    on.engine.runner.launch_decode = spy
    try:
        got = on.generate(PROMPTS[3:6], penalized, use_tqdm=False)
    finally:
        del on.engine.runner.launch_decode
    assert sum(c > 0 for c in carried) >= 20  # the penalized batch decoded with steps in flight
    assert _view(got) == _view(off.generate(PROMPTS[3:6], penalized, use_tqdm=False))
    plain = off.generate(PROMPTS[3:5], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in plain] != [o.outputs[0].token_ids for o in got[:2]]  # penalties bite
    _assert_clean(on)


def test_preemption_identical(llama_path, pair):
    """A cache too small for the batch: decode steps preempt sequences whose token is still in flight."""
    off, _ = pair
    small = LLM(llama_path, max_model_len=128, max_num_seqs=8, block_size=8, num_kv_blocks=16, async_scheduling=True)
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    got = small.generate(PROMPTS[:4], sp, use_tqdm=False)
    assert small.stats()["num_preemptions"] > 0
    assert _view(got) == _view(off.generate(PROMPTS[:4], sp, use_tqdm=False))
    _assert_clean(small)


def test_chunked_prefill_and_prefix_hits_identical(llama_path):
    """A long prompt prefilled in chunks between decode steps (a step in flight at each chunk), and prompts that
    share cached prefix blocks written by in-flight steps."""
    kw = {"max_model_len": 128, "max_num_seqs": 8, "block_size": 8, "long_prefill_chunk": 16}
    off, on = LLM(llama_path, async_scheduling=False, **kw), LLM(llama_path, async_scheduling=True, **kw)
    shared = PROMPTS[0] * 6
    prompts = [PROMPTS[1], PROMPTS[2], shared + PROMPTS[3], shared + PROMPTS[4]]
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for llm in (off, on):
        llm.generate(prompts[:2], sp, use_tqdm=False)  # something to decode while the long prompts chunk
    eng_outs = []
    for llm in (off, on):
        eng = llm.engine
        eng.add_request("d0", prompts[0], sp)
        eng.step()
        eng.step()
        eng.add_request("c0", prompts[2], sp)
        done = {}
        for _ in range(12):  # c0's chunks, then decode steps with c0 in flight
            done.update({o.request_id: o for o in eng.step() if o.finished})
        eng.add_request("c1", prompts[3], sp)  # its prefix blocks were written by c0's steps
        while eng.has_unfinished_requests():
            done.update({o.request_id: o for o in eng.step() if o.finished})
        eng_outs.append({k: _view([v]) for k, v in done.items()})
    assert eng_outs[0] == eng_outs[1] and len(eng_outs[0]) == 3
    assert on.stats()["prefix_cache_hit_tokens"] > 0
    _assert_clean(on)


def test_streaming_never_shows_placeholders_or_tokens_after_a_stop(pair):
    off, on = pair
    ref = off.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    stop_tok = ref[0].outputs[0].token_ids[4]
    eng = on.engine
    eng.add_request("s0", PROMPTS[0], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                     stop_token_ids=[stop_tok]))
    eng.add_request("s1", PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    seen: dict[str, list[list[int]]] = {"s0": [], "s1": []}
    while eng.has_unfinished_requests():
        for out in eng.step():
            seen[out.request_id].append(out.outputs[0].token_ids)
    final = seen["s0"][-1]
    assert final == ref[0].outputs[0].token_ids[:ref[0].outputs[0].token_ids.index(stop_tok) + 1]
    for snaps in seen.values():
        assert all(PLACEHOLDER not in s and s == snaps[-1][:len(s)] for s in snaps)
        assert [len(s) for s in snaps] == sorted({len(s) for s in snaps}), "each stream only grows"
    assert len(seen["s1"][-1]) == 12
    _assert_clean(on)


def test_abort_while_a_step_is_in_flight_frees_everything(pair):
    _, on = pair
    eng = on.engine
    eng.add_request("a0", PROMPTS[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    eng.add_request("a1", PROMPTS[1], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    for _ in range(4):
        eng.step()
    assert eng.in_flight is not None
    out = eng.abort_request("a0")
    assert out.outputs[0].finish_reason == "abort" and PLACEHOLDER not in out.outputs[0].token_ids
    done = []
    while eng.has_unfinished_requests():
        done += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in done] == ["a1"] and len(done[0].outputs[0].token_ids) == 6
    _assert_clean(on)


def test_static_inputs_take_tokens_from_the_previous_sample(pair):
    """The CUDA-graph input path with ``prev_rows``: placeholder rows read the device buffer, the rest the host."""
    off, _ = pair
    engine, runner = off.engine, off.engine.runner
    for i, p in enumerate(PROMPTS[:3]):
        engine.add_request(f"st-{i}", p, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    engine.step()
    seqs, is_prefill = engine.scheduler.schedule()
    assert not is_prefill and len(seqs) == 3
    with torch.no_grad():
        eager = runner.decode_logits(seqs).clone()
        real = [s.token_ids[-1] for s in seqs]
        runner._sampled[:3] = torch.tensor([real[2], 0, real[0]])
        for i in (0, 2):
            seqs[i].token_ids[-1] = PLACEHOLDER
        prev = [2, -1, 0]
        runner.alloc_static_inputs(8)
        runner.fill_static_inputs(seqs, 4, prev)
        static = runner.static_step(4).clone()
        carried = runner.decode_logits(seqs, prev)  # the eager path (no graphs on CPU) does the same
        for i in (0, 2):
            seqs[i].token_ids[-1] = real[i]
    assert torch.allclose(static[:3], eager, atol=1e-5) and torch.allclose(carried, eager, atol=1e-5)
    assert runner._gbuf["meta"][4, :4].tolist() == [2, -1, 0, -1]
    for i in range(3):
        engine.abort_request(f"st-{i}")
    _assert_clean(off)


def test_take_previous():
    out = take_previous(torch.tensor([5, 6, 7]), torch.tensor([-1, 1, 0]), torch.tensor([40, 41, 42]))
    assert out.tolist() == [5, 41, 40]


def test_config_switch():
    assert EngineConfig("m").overlaps(is_cuda=True) and not EngineConfig("m").overlaps(is_cuda=False)
    assert EngineConfig("m", async_scheduling=True).overlaps(is_cuda=False)
    assert not EngineConfig("m", async_scheduling=False).overlaps(is_cuda=True)
    assert not EngineConfig("m", num_speculative_tokens=2).overlaps(is_cuda=True)
    assert EngineConfig("m", tensor_parallel_size=2).overlaps(is_cuda=True)
    with pytest.raises(NotBuiltYetError, match="async_scheduling"):
        EngineConfig("m", async_scheduling=True, num_speculative_tokens=2)


@pytest.mark.parametrize("what,base,new", [("async", "sync", "async"), ("gemv", "cublas", "gemv"),
                                           ("admit", "one_by_one", "batched"),
                                           ("attention", "three_launches", "one_launch"),
                                           ("pdl", "no_pdl", "pdl"), ("kv", "bf16_kv", "fp8_kv"),
                                           ("order", "submitted", "longest_first")])
def test_bench_compare_smoke(random_checkpoint, benchmark_script, what, base, new):
    """``benchmarks/engine_vs_hf.py --compare-async`` / ``-gemv`` / ``-admit`` / ``-attention`` / ``-pdl`` / ``-kv`` /
    ``-order``:
    both modes run the same workload and fill the table (on CPU the kernel switches change nothing, nor admission at
    4 seats: the run checks the benchmark's code, not the kernels or the scheduler)."""
    from rich.console import Console

    from onecard.bench.engine_bench import EngineBenchConfig

    bench = benchmark_script("engine_vs_hf")
    cfg = EngineBenchConfig(random_checkpoint("llama-2-7b"), dtype="float32", device="cpu", num_prompts=4,
                            mean_input=12, mean_output=6, max_model_len=64, decode_prompt_len=8, decode_tokens=6,
                            memory_cap_gib=None, max_num_seqs=4, run_hf=False)
    r = bench.compare(cfg, what, Console(quiet=True))
    assert r[f"{base}_offline_output_tokens"] == r[f"{new}_offline_output_tokens"] > 0
    assert r[f"{new}_bs1_tok_s"] > 0 and 0 < r[f"{base}_bs1_roofline_fraction"] and r[f"{new}_bs1_speedup"] > 0
    Console(quiet=True).print(bench.compare_table(r, what))
    bench.compare_figure(r, what)


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_gpu_async_identical_and_decode_steps_never_sync(enforce_eager):
    """On CUDA (graphs or eager): the same greedy tokens with the switch on and off (a batch that stays together,
    so both runs use the same batch shapes), and a steady-state decode step never blocks on the GPU except on the
    event of the step before (``set_sync_debug_mode('error')`` raises on ``.item()``/``.tolist()``/pageable copies)."""
    from onecard.testing import make_random_checkpoint

    path = make_random_checkpoint("llama-2-7b", "tiny", dtype="bfloat16")
    kw = {"dtype": "bfloat16", "max_model_len": 256, "max_num_seqs": 8, "gpu_memory_utilization": 0.3,
          "enforce_eager": enforce_eager}
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    off = LLM(path, async_scheduling=False, **kw)
    want = [off.generate(PROMPTS[:4], sp, use_tqdm=False), off.generate(PROMPTS[4], sp, use_tqdm=False)]
    del off
    torch.cuda.empty_cache()
    on = LLM(path, **kw)
    assert on.engine.overlap, "async scheduling is the CUDA default"
    got = [on.generate(PROMPTS[:4], sp, use_tqdm=False), on.generate(PROMPTS[4], sp, use_tqdm=False)]
    assert [_view(g) for g in got] == [_view(w) for w in want]
    eng = on.engine
    for i, p in enumerate(PROMPTS[:3]):
        eng.add_request(f"g{i}", p, sp)
    eng.add_request("s", PROMPTS[3], SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1, max_tokens=64,
                                                    ignore_eos=True, logprobs=2))
    eng.add_request("p", PROMPTS[4], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True,
                                                    repetition_penalty=1.2, frequency_penalty=0.5))  # counts on GPU
    for _ in range(4):  # the prefill, then decode steps until one is in flight
        eng.step()
    assert eng.in_flight is not None
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            eng.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    while eng.has_unfinished_requests():
        eng.step()
    _assert_clean(on)
