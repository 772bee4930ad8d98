"""A small in-process stand-in for ``onecard.engine.AsyncEngine`` (the contract the server is written against).

It generates seeded pseudo-random tokens with a real tokenizer, holds 'KV blocks'
per request and frees them on finish or abort, so server tests can check
deterministic behaviour - readiness, errors, disconnect -> abort -> blocks freed -
without a model (requests take the real ``SamplingParams``). The subprocess
tests use the real engine.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field


@dataclass
class FakeCompletion:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0


@dataclass
class FakeRequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[FakeCompletion]
    finished: bool
    metrics: dict = field(default_factory=dict)
    prompt_logprobs: list[dict[int, float] | None] | None = None


class FakeEngine:
    def __init__(self, tokenizer, max_model_len: int = 128, step_s: float = 0.002, num_blocks: int = 256,
                 block_size: int = 16, ready: bool = True) -> None:
        self.tokenizer, self.max_model_len, self.step_s = tokenizer, max_model_len, step_s
        self.num_blocks, self.block_size, self.ready = num_blocks, block_size, ready
        self.blocks: dict[str, int] = {}
        self.aborted: set[str] = set()
        self.seen_params: list[object] = []
        self.shutdown_called = False
        self.reply: str | None = None  # set: every answer is this text's tokens, then a stop

    def stats(self) -> dict:
        used = sum(self.blocks.values())
        return {"num_running": len(self.blocks), "num_waiting": 0, "kv_blocks_total": self.num_blocks,
                "kv_blocks_used": used, "kv_usage": used / self.num_blocks}

    async def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)
        self.blocks.pop(request_id, None)

    async def shutdown(self, timeout: float = 30.0) -> None:
        self.shutdown_called = True

    async def generate(self, prompt, params, request_id: str):
        ids = list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt)
        self.seen_params.append(params)
        self.blocks[request_id] = -(-(len(ids) + params.max_tokens) // self.block_size) * params.n
        rng = random.Random(params.seed if params.seed is not None else hash(request_id))
        outs = [FakeCompletion(i, logprobs=[] if params.logprobs is not None else None) for i in range(params.n)]
        vocab = len(self.tokenizer)
        prompt_lp = None if params.prompt_logprobs is None else [None] + [{t: -1.0} for t in ids[1:]]
        try:
            while any(o.finish_reason is None for o in outs):
                await asyncio.sleep(self.step_s)
                if request_id in self.aborted:
                    return
                for o in outs:
                    if o.finish_reason is not None:
                        continue
                    script = self.tokenizer.encode(self.reply, add_special_tokens=False) if self.reply else None
                    tid = script[len(o.token_ids)] if script else rng.randrange(3, vocab)
                    o.token_ids.append(tid)
                    if o.logprobs is not None:
                        others = {rng.randrange(3, vocab): -2.0 - k for k in range(params.logprobs)}
                        o.logprobs.append({**others, tid: -0.5})
                    o.text = self.tokenizer.decode(o.token_ids, skip_special_tokens=True)
                    for s in params.stop or []:
                        if s in o.text:
                            o.text, o.finish_reason = o.text[:o.text.index(s)], "stop"
                    if script and len(o.token_ids) == len(script):
                        o.finish_reason = "stop"
                    if o.finish_reason is None and len(o.token_ids) >= params.max_tokens:
                        o.finish_reason = "length"
                done = all(o.finish_reason is not None for o in outs)
                yield FakeRequestOutput(request_id, prompt if isinstance(prompt, str) else None, ids,
                                        [FakeCompletion(o.index, o.text, list(o.token_ids), o.finish_reason,
                                                        None if o.logprobs is None else list(o.logprobs)) for o in outs], done,
                                        prompt_logprobs=prompt_lp)
        finally:
            self.blocks.pop(request_id, None)
