"""``POST /v1/rag/ask``: question answering with citations over a ``onecard rag`` index, on the served engine.

Retrieval and prompt building are ``onecard.rag.answer.ask`` (run in a worker
thread: embedding and SQLite are blocking); the answer is written by the
server's own engine, batched with every other request, greedy with repetition
penalty 1.1 like the offline ``EngineWriter``, through the chat template when
the model has one.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from onecard.serve.completions import Generation, resolve_max_tokens
from onecard.serve.errors import APIError, bad_request
from onecard.serve.metrics import ServerMetrics
from onecard.serve.protocol import new_id

ANSWER_TIMEOUT_S = 600.0


class RagAskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1)
    k: int = Field(5, ge=1, le=50)
    mode: Literal["hybrid", "vector", "bm25"] = "hybrid"
    max_tokens: int = Field(256, ge=1)
    min_similarity: float | None = Field(None, ge=-1.0, le=1.0)


def rag_disabled() -> APIError:
    return APIError(404, "RAG is not enabled on this server; start it with --rag-db DB (an index built by "
                         "'onecard rag index')", "invalid_request_error", None, "rag_not_enabled")


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(prompt))


async def _write(engine, metrics: ServerMetrics, max_model_len: int, prompt: str, max_tokens: int) -> str:
    from onecard.engine import SamplingParams

    ids = _prompt_ids(engine.tokenizer, prompt)
    resolve_max_tokens(len(ids), max_tokens, max_model_len, "question")  # 400 when question + passages do not fit
    gen = Generation(engine, metrics, [ids], SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                            repetition_penalty=1.1), new_id("rag"), 1)
    await gen.start()
    async with aclosing(gen.updates()) as updates:
        async for _ in updates:
            pass
    gen.check_not_aborted()
    return gen.finals[0].outputs[0].text.strip()


async def rag_answer(engine, metrics: ServerMetrics, max_model_len: int, db: Path, model_name: str,
                     req: RagAskRequest) -> dict:
    from onecard.rag.answer import DEFAULT_MIN_SIMILARITY, ask

    loop = asyncio.get_running_loop()

    def generate(prompt: str) -> str:  # called by ask() in the worker thread
        fut = asyncio.run_coroutine_threadsafe(_write(engine, metrics, max_model_len, prompt, req.max_tokens), loop)
        return fut.result(ANSWER_TIMEOUT_S)

    min_sim = DEFAULT_MIN_SIMILARITY if req.min_similarity is None else req.min_similarity
    try:
        ans = await asyncio.to_thread(ask, req.question, db, k=req.k, mode=req.mode, min_similarity=min_sim,
                                      max_tokens=req.max_tokens, generate=generate)
    except ValueError as err:  # BadInputError from retrieval (empty query, bad index)
        raise bad_request(str(err).splitlines()[0]) from None
    return {"id": new_id("rag"), "object": "rag.answer", "model": model_name, "answer": ans.text,
            "unknown": ans.unknown, "citations": [asdict(c) for c in ans.citations],
            "context": [asdict(c) for c in ans.context], "best_similarity": ans.best_similarity,
            "invalid_citations": ans.invalid_citations}
