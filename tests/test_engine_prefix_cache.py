"""Prefix caching: same greedy outputs with and without, hits on shared prompts, refcounts back to zero,
LRU eviction under pressure, preemption with shared blocks; plus random-workload invariants with sharing."""

from __future__ import annotations

import random

import pytest

from onecard.engine import LLM, SamplingParams
from onecard.engine.block_manager import BlockManager
from onecard.engine.sampling_params import SamplingParams as SP
from onecard.engine.scheduler import Scheduler
from onecard.engine.sequence import Sequence

SYSTEM = "You are a careful assistant. Answer in one line, cite the source file, and never guess.\n"
QUESTIONS = ["def read_config(path):", "import os\nimport sys", "class Parser:", "for i in range(10):"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama_path(random_checkpoint):
    return random_checkpoint("llama-2-7b")


def _run(llm, prompts, max_tokens=16):
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]


def _assert_all_free(llm):
    bm = llm.engine.block_manager
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert bm.num_free_blocks == bm.num_blocks and not bm.used_block_ids
    assert llm.stats()["kv_blocks_used"] == 0


@pytest.fixture(scope="module")
def reference(llama_path):
    off = LLM(llama_path, max_model_len=128, max_num_seqs=8, block_size=8, enable_prefix_caching=False)
    prompts = [SYSTEM + q for q in QUESTIONS]
    out = _run(off, prompts, 16)
    assert off.stats()["prefix_cache_hit_tokens"] == 0
    return prompts, out


def test_same_greedy_outputs_with_and_without_and_refcounts_return_to_zero(llama_path, reference):
    prompts, ref = reference
    on = LLM(llama_path, max_model_len=128, max_num_seqs=8, block_size=8)
    assert _run(on, prompts[:1], 16) == ref[:1]  # fills the cache with the system prompt
    assert _run(on, prompts, 16) == ref          # every later request shares it
    assert _run(on, prompts, 16) == ref          # and now whole prompts (all but the last block) hit
    _assert_all_free(on)
    assert on.stats()["prefix_cache_blocks"] > 0  # finished requests' blocks stay cached on the free list


def test_shared_system_prompt_hits_are_counted(llama_path):
    llm = LLM(llama_path, max_model_len=128, max_num_seqs=8, block_size=8)
    sys_ids = llm.tokenizer.encode(SYSTEM)
    _run(llm, [SYSTEM + QUESTIONS[0]], 4)
    before = llm.stats()["prefix_cache_hit_tokens"]
    _run(llm, [SYSTEM + q for q in QUESTIONS[1:4]], 4)
    stats = llm.stats()
    shared_full_blocks = (len(sys_ids) - 1) // 8  # the last system-prompt token may share a block with the question
    assert stats["prefix_cache_hit_tokens"] - before >= 3 * shared_full_blocks * 8 > 0
    assert 0 < stats["prefix_cache_hit_rate"] < 1
    assert stats["prefix_caching"] is True


def test_eviction_under_pressure_keeps_outputs(llama_path, reference):
    prompts, ref = reference
    # 20 blocks of 8 tokens: far too few to keep every finished prompt cached, so LRU blocks are reused.
    small = LLM(llama_path, max_model_len=128, max_num_seqs=2, block_size=8, num_kv_blocks=20)
    got = []
    for p in prompts:
        got += _run(small, [p], 16)
    got2 = _run(small, prompts[::-1], 16)
    assert got == ref and got2 == ref[::-1]
    bm = small.engine.block_manager
    assert bm.num_evictions > 0
    assert bm.num_hit_tokens > 0
    for h, block_id in bm.hash_to_block.items():  # every registration names a block that still holds it
        assert bm.blocks[block_id].hash == h
    _assert_all_free(small)


def test_preemption_with_shared_blocks_keeps_outputs(llama_path, reference):
    prompts, ref = reference
    small = LLM(llama_path, max_model_len=128, max_num_seqs=8, block_size=8, num_kv_blocks=16)
    _run(small, prompts[:1], 16)
    got = _run(small, prompts, 16)
    assert small.stats()["num_preemptions"] > 0
    assert got == ref
    _assert_all_free(small)


def test_collision_cannot_alias_and_last_block_is_always_computed():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = Sequence("a", 0, list(range(3, 11)), SP(), None)  # exactly two full blocks
    bm.allocate(a)
    a.num_cached_tokens = 8
    bm.register_computed(a, 8)
    b = Sequence("b", 0, list(range(3, 11)), SP(), None)
    bm.allocate(b)
    assert b.num_cached_tokens == 4 and b.block_table[0] == a.block_table[0] != b.block_table[1]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    # Forge a collision: the hash of b's first block now "names" a block with other tokens.
    h = a.block_hashes[0]
    bm.blocks[a.block_table[0]].token_ids = [99, 99, 99, 99]
    c = Sequence("c", 0, list(range(3, 12)), SP(), None)
    bm.allocate(c)
    assert c.num_cached_tokens == 0 and bm.hash_to_block[h] == a.block_table[0]
    for s in (a, b, c):
        bm.deallocate(s)
    assert all(blk.ref_count == 0 for blk in bm.blocks) and bm.num_free_blocks == 8


def test_random_workload_with_sharing_and_chunking_has_no_leaks():
    rng = random.Random(1)
    bm = BlockManager(num_blocks=48, block_size=8, enable_prefix_caching=True)
    sched = Scheduler(bm, max_num_seqs=12, max_num_batched_tokens=64, long_prefill_chunk=24)
    prefixes = [[rng.randint(3, 50) for _ in range(rng.randint(8, 40))] for _ in range(5)]
    pending = [Sequence(f"r{i}", 0, rng.choice(prefixes) + [rng.randint(3, 50) for _ in range(rng.randint(1, 30))],
                        SP(max_tokens=rng.randint(1, 40)), None) for i in range(400)]
    finished = 0
    while pending or sched.has_unfinished():
        for _ in range(rng.randint(0, 3)):
            if pending:
                sched.add(pending.pop(0))
        seqs, is_prefill = sched.schedule()
        if is_prefill:
            assert sum(s.num_scheduled_tokens for s in seqs) <= 64
            assert all(s.num_scheduled_tokens <= 24 for s in seqs)
        owners: dict[int, int] = {}
        for s in sched.running:
            assert len(s.block_table) == len(set(s.block_table))
            for b in s.block_table:
                owners[b] = owners.get(b, 0) + 1
        assert all(bm.blocks[b].ref_count == n for b, n in owners.items())
        assert set(owners) == bm.used_block_ids
        assert bm.num_free_blocks + len(bm.used_block_ids) == bm.num_blocks
        for s in seqs:
            assert len(s.block_table) >= (s.num_cached_tokens + 7) // 8, "every computed token has a slot"
            if s.num_cached_tokens >= len(s):  # this step samples for it
                s.token_ids.append(rng.randint(3, 50))
                if s.num_completion_tokens >= s.params.max_tokens:
                    sched.finish(s)
                    finished += 1
    assert finished == 400
    assert all(b.ref_count == 0 for b in bm.blocks) and bm.num_free_blocks == bm.num_blocks
    assert bm.num_hit_tokens > 0 and sched.num_preemptions > 0
