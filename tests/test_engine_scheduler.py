"""Block manager + scheduler invariants on fake sequences (no model): no leaks, limits, FCFS, preemption."""

from __future__ import annotations

import random

import pytest

from onecard.engine.block_manager import BlockManager
from onecard.engine.config import EngineConfig
from onecard.engine.sampling_params import SamplingParams
from onecard.engine.scheduler import Scheduler
from onecard.engine.sequence import Sequence, SequenceStatus
from onecard.errors import BadInputError


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


def _admitting(admit_batch: int) -> Scheduler:
    """Eight seats, room for every block and token: only admission decides who runs."""
    return Scheduler(BlockManager(num_blocks=100, block_size=8), max_num_seqs=8, max_num_batched_tokens=1000,
                     admit_batch=admit_batch)


def _decoding(sched: Scheduler, n: int) -> list[Sequence]:
    """``n`` sequences admitted and past their prefill (each holds its first sampled token)."""
    seqs = [Sequence(f"d{i}", 0, [1, 2, 3], SamplingParams(), None) for i in range(n)]
    for s in seqs:
        sched.add(s)
    admitted, prefill = sched.schedule()
    assert prefill and admitted == seqs
    for s in seqs:
        s.token_ids.append(5)
    return seqs


def test_waiting_requests_join_decoding_ones_in_batches():
    """A freed seat alone does not stop every decoding sequence for a one-prompt prefill: admission waits for
    admit_batch free seats (or for the whole queue to fit), and does not wait when nothing decodes."""
    sched = _admitting(4)
    running = _decoding(sched, 8)
    queue = [Sequence(f"w{i}", 0, [1, 2], SamplingParams(), None) for i in range(10)]
    for s in queue:
        sched.add(s)
    for k in range(3):  # 1, 2, 3 seats free, 10 waiting: keep decoding
        sched.finish(running[k])
        seqs, prefill = sched.schedule()
        assert not prefill and seqs == running[k + 1:]
        for s in seqs:
            s.token_ids.append(5)
    sched.finish(running[3])
    seqs, prefill = sched.schedule()  # 4 free: the four oldest join in one prefill step
    assert prefill and seqs == queue[:4]
    for s in seqs:
        s.token_ids.append(5)
    seqs, prefill = sched.schedule()
    assert not prefill and len(seqs) == 8
    sched2 = _admitting(4)
    first = _decoding(sched2, 8)
    late = Sequence("late", 0, [1, 2], SamplingParams(), None)
    sched2.add(late)
    sched2.finish(first[0])
    seqs, prefill = sched2.schedule()  # the whole queue (one request) fits the one free seat: no waiting
    assert prefill and seqs == [late]
    sched3 = _admitting(8)
    for s in [Sequence(f"x{i}", 0, [1, 2], SamplingParams(), None) for i in range(3)]:
        sched3.add(s)
    seqs, prefill = sched3.schedule()  # nothing decodes: admitted at once whatever admit_batch says
    assert prefill and len(seqs) == 3


def test_admit_batch_size_default_and_bounds():
    cfg = EngineConfig("m", max_num_seqs=256)
    cfg.resolve(4096)
    assert cfg.admit_batch_size == 32
    cfg = EngineConfig("m", max_num_seqs=4)
    cfg.resolve(4096)
    assert cfg.admit_batch_size == 1
    with pytest.raises(BadInputError, match="admit_batch_size=9: must be an integer in 1..max_num_seqs"):
        EngineConfig("m", max_num_seqs=8, admit_batch_size=9)


def test_a_free_seat_is_not_held_back_forever():
    """When seats free up slowly (long outputs), the queue's head joins after admit_batch decode steps anyway."""
    sched = _admitting(4)
    running = _decoding(sched, 8)
    queue = [Sequence(f"w{i}", 0, [1, 2], SamplingParams(), None) for i in range(10)]
    for s in queue:
        sched.add(s)
    sched.finish(running[0])
    for _ in range(4):  # one seat free, ten waiting: held for admit_batch decode steps
        seqs, prefill = sched.schedule()
        assert not prefill
        for s in seqs:
            s.token_ids.append(5)
    seqs, prefill = sched.schedule()
    assert prefill and seqs == queue[:1]
    for s in seqs:
        s.token_ids.append(5)
    seqs, prefill = sched.schedule()  # the count starts again after an admission
    assert not prefill and len(seqs) == 8
