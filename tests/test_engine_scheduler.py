"""Block manager + scheduler invariants on fake sequences (no model): no leaks, limits, FCFS, preemption."""

from __future__ import annotations

import random

from onecard.engine.block_manager import BlockManager
from onecard.engine.sampling_params import SamplingParams
from onecard.engine.scheduler import Scheduler
from onecard.engine.sequence import Sequence, SequenceStatus


def _check_invariants(bm: BlockManager, sched: Scheduler) -> None:
    owned = [b for s in sched.running for b in s.block_table]
    assert len(owned) == len(set(owned)), "a block is owned twice"
    assert set(owned) == bm.used_block_ids
    assert len(bm.free_block_ids) + len(bm.used_block_ids) == bm.num_blocks
    assert all(bm.blocks[b].ref_count == 1 for b in owned)
    assert all(not s.block_table for s in sched.waiting)
    for s in sched.running:
        assert len(s.block_table) >= s.num_blocks(bm.block_size) - 1


def test_no_block_leaks_after_1000_random_requests():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=8)
    sched = Scheduler(bm, max_num_seqs=16, max_num_batched_tokens=256)
    pending = [Sequence(f"r{i}", 0, [1] * rng.randint(1, 120), SamplingParams(max_tokens=rng.randint(1, 60)), None)
               for i in range(1000)]
    finished = 0
    steps = 0
    while pending or sched.has_unfinished():
        for _ in range(rng.randint(0, 4)):
            if pending:
                sched.add(pending.pop(0))
        seqs, is_prefill = sched.schedule()
        steps += 1
        assert len(seqs) <= 16
        if is_prefill:
            assert sum(len(s) for s in seqs) <= 256
        for s in seqs:
            assert s.status == SequenceStatus.RUNNING
            assert len(s.block_table) == s.num_blocks(8), "every token to be computed has a cache slot"
            s.token_ids.append(rng.randint(3, 100))
            if s.num_completion_tokens >= s.params.max_tokens or rng.random() < 0.02:
                sched.finish(s)
                finished += 1
        _check_invariants(bm, sched)
    assert finished == 1000
    assert bm.num_free_blocks == bm.num_blocks and not bm.used_block_ids
    assert sched.num_preemptions > 0, "the workload was meant to fill the cache"


def test_fcfs_admission_and_preemption_goes_to_front():
    bm = BlockManager(num_blocks=4, block_size=8)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a = Sequence("a", 0, [1] * 15, SamplingParams(), None)  # 2 blocks
    b = Sequence("b", 0, [1] * 16, SamplingParams(), None)  # 2 blocks
    c = Sequence("c", 0, [1] * 4, SamplingParams(), None)
    for s in (a, b, c):
        sched.add(s)
    seqs, prefill = sched.schedule()
    assert prefill and seqs == [a, b]  # c does not fit; it waits (and nothing behind it jumps ahead)
    for s in seqs:
        s.token_ids.append(5)
    seqs, prefill = sched.schedule()  # decode: b needs a third block and the cache is full -> b (newest) preempted
    assert not prefill and seqs == [a]
    assert list(sched.waiting) == [b, c] and sched.num_preemptions == 1 and b.block_table == []


def test_max_num_seqs_limits_running():
    bm = BlockManager(num_blocks=100, block_size=8)
    sched = Scheduler(bm, max_num_seqs=3, max_num_batched_tokens=1000)
    for i in range(5):
        sched.add(Sequence(str(i), 0, [1, 2], SamplingParams(), None))
    seqs, _ = sched.schedule()
    assert len(seqs) == 3 and len(sched.waiting) == 2
