"""``LLM(tensor_parallel_size=2)`` on CPU (gloo, 2 processes): the same greedy tokens as one process, workers that
exit with the LLM (a second TP engine then starts in the same process), and a dead worker reported as a one-line error instead of a hang."""

from __future__ import annotations

import gc
import os
import signal
import time

import pytest
import torch

from onecard.engine import LLM, SamplingParams
from onecard.errors import OnecardError
from onecard.testing import make_random_checkpoint

PROMPTS = [[5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61, 65, 69, 73, 77], [7, 3, 11], [100] * 12]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
# Small engine, but every path: chunked prefill over the paged cache (chunk 8 < prompt 19), shared prefixes
# (two requests with one prompt), decode batches of 1-4, and n-gram speculative verify steps in the GQA case.
ENGINE = {"device": "cpu", "max_model_len": 64, "max_num_seqs": 4, "block_size": 8, "long_prefill_chunk": 8}
CASES = {
    "llama-2-mha": ("llama-2-7b", None, {}),
    "llama-3-gqa": ("llama-3.1-8b", {"num_key_value_heads": 2}, {"num_speculative_tokens": 2}),
}


def _generate(llm: LLM) -> list[list[int]]:
    outs = llm.generate([*PROMPTS, PROMPTS[0]], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _gone(pids: list[int], within_s: float = 15) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) counts as gone
                    alive += [pid] if f.read().split()[2] != "Z" else []
            except (ProcessLookupError, FileNotFoundError):
                pass
        if not alive:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("case", CASES)
def test_tp2_generates_the_single_process_tokens(case):
    arch, overrides, extra = CASES[case]
    folder = make_random_checkpoint(arch, "tiny", overrides=overrides)
    ref = _generate(LLM(folder, **ENGINE, **extra))
    llm = LLM(folder, tensor_parallel_size=2, **ENGINE, **extra)
    runner = llm.engine.runner
    pids = [p.pid for p, _ in runner._workers]
    assert len(pids) == 1 and _gone(pids, within_s=0) is False
    a = runner.model.args
    assert a.num_kv_heads == runner.model.full_args.num_kv_heads // 2  # the cache holds this rank's heads only
    assert runner.kv_cache.shape[4] == a.num_kv_heads
    got = _generate(llm)
    assert got == ref
    assert all(len(t) == GREEDY.max_tokens for t in got)
    if extra.get("num_speculative_tokens"):
        assert llm.stats()["spec_draft_tokens"] > 0  # the verify path ran on both ranks
    del llm, runner
    gc.collect()
    assert _gone(pids), "the worker outlived its LLM"


def test_dead_worker_is_a_one_line_error():
    folder = make_random_checkpoint("llama-2-7b", "tiny")
    llm = LLM(folder, tensor_parallel_size=2, **ENGINE)
    proc, _ = llm.engine.runner._workers[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    t0 = time.monotonic()
    with pytest.raises(OnecardError, match="worker rank 1 exited") as err:
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    assert time.monotonic() - t0 < 30 and "\n" not in str(err.value)
    llm.engine.runner.close()
    assert not torch.distributed.is_initialized()  # the group is left: the next TP engine can start here
