"""AsyncEngine's hand-off to asyncio: one loop wake-up per engine step, newest-output streams, errors after outputs."""

from __future__ import annotations

import asyncio
import random

import pytest

from onecard.engine import AsyncEngine, SamplingParams
from onecard.engine.async_engine import EngineDeadError
from onecard.engine.detokenizer import fast_decode

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama_path(random_checkpoint):
    return random_checkpoint("llama-2-7b")


@pytest.fixture
def engine(llama_path):
    eng = AsyncEngine(llama_path, max_model_len=128, max_num_seqs=4, block_size=8)
    yield eng
    eng._stop.set()
    eng._wake.set()
    eng._thread.join(10)


async def _idle(engine: AsyncEngine) -> None:
    for _ in range(200):
        if engine.stats()["num_requests"] == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the engine did not go idle: {engine.stats()}")


def test_one_event_loop_wakeup_per_engine_step(engine):
    """Four streams share each step: the engine thread calls into the loop once per step, not once per request."""
    steps = []
    step = engine.engine.step
    engine.engine.step = lambda *a, **k: steps.append(1) or step(*a, **k)

    async def main():
        loop = asyncio.get_running_loop()
        wakeups = []
        threadsafe = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a, **k: wakeups.append(1) or threadsafe(*a, **k)

        async def one(i: int) -> int:
            params = SamplingParams(max_tokens=8, ignore_eos=True, seed=i)
            async for out in engine.generate([5 + i, 6, 7], params, f"r{i}"):
                pass
            assert out.finished and len(out.outputs[0].token_ids) == 8
            return len(out.outputs[0].token_ids)

        assert await asyncio.gather(*(one(i) for i in range(4))) == [8] * 4
        return len(wakeups)

    wakeups = asyncio.run(main())
    assert 0 < wakeups <= len(steps), (wakeups, len(steps))


def test_slow_consumer_gets_the_newest_output(engine):
    """Outputs are cumulative: a consumer that falls behind skips to the latest one and loses no token."""

    async def main():
        params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0)
        stream = engine.generate("def f():", params, "slow")
        first = await stream.__anext__()
        await _idle(engine)  # the engine finishes the request while nobody reads
        rest = [out async for out in stream]
        return first, rest

    first, rest = asyncio.run(main())
    # the first output holds whatever the engine thread had made when the loop woke this consumer: one token
    # usually, two once under CI load (the engine steps on its own thread); never all of them
    seen = first.outputs[0].token_ids
    assert not first.finished and 1 <= len(seen) < 12
    assert len(rest) == 1 and rest[0].finished and len(rest[0].outputs[0].token_ids) == 12
    assert rest[0].outputs[0].token_ids[:len(seen)] == seen


def test_outputs_before_a_shutdown_are_read_then_the_error(engine):
    async def main():
        seen = []
        with pytest.raises(EngineDeadError):
            async for out in engine.generate("import os", SamplingParams(max_tokens=100, ignore_eos=True), "long"):
                seen.append(out)
                if len(seen) == 1:
                    await engine.shutdown(10)
        return seen

    seen = asyncio.run(main())
    assert seen and not seen[-1].finished
    assert not engine.ready


def test_fast_decode_is_the_tokenizers_decode(engine):
    tok = engine.tokenizer
    assert fast_decode(tok) is not tok.decode  # a fast tokenizer without space clean-up: the Rust call
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 12))]
        for skip in (True, False):
            assert fast_decode(tok)(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)


def test_fast_decode_keeps_transformers_when_it_cleans_up_spaces(engine):
    class CleansUp:
        backend_tokenizer = object()
        clean_up_tokenization_spaces = True

        def decode(self, ids, skip_special_tokens=False):
            return "x"

    tok = CleansUp()
    assert fast_decode(tok) == tok.decode
