"""The two generation endpoints: OpenAI request -> token ids + SamplingParams -> engine -> OpenAI response or SSE.

One ``Generation`` per HTTP request. It tokenizes (so the context-length check
and usage counts happen before any GPU work), starts one engine request per
prompt, turns the engine's *cumulative* ``RequestOutput`` updates into
OpenAI deltas, records TTFT / inter-token latency, and - whatever ends the
request (finish, client disconnect, cancellation at shutdown) - aborts every
engine request that has not finished so its KV blocks are freed at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace

import anyio

from onecard.errors import OnecardError
from onecard.serve.errors import APIError, bad_request
from onecard.serve.metrics import ServerMetrics
from onecard.serve.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    FunctionCall,
    ResponseMessage,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
    new_id,
    now,
)
from onecard.serve.tool_parsers import parse_tool_calls

log = logging.getLogger(__name__)

_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                    "frequency_penalty", "min_tokens")


def sampling_params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None = None):
    """Map an OpenAI request onto the engine's SamplingParams; the engine's ValueError becomes a 400."""
    from onecard.engine import SamplingParams

    kw = {name: getattr(req, name) for name in _SAMPLING_FIELDS if getattr(req, name) is not None}
    try:
        if req.logit_bias:
            if not all(token.isdigit() for token in req.logit_bias):
                raise ValueError("logit_bias keys must be token ids (strings of digits)")
            kw["logit_bias"] = {int(token): bias for token, bias in req.logit_bias.items()}
        return SamplingParams(n=req.n, max_tokens=max_tokens, stop=req.stop, stop_token_ids=req.stop_token_ids,
                              seed=req.seed, ignore_eos=req.ignore_eos, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs,
                              skip_special_tokens=req.skip_special_tokens, **kw, **req.structured_output())
    except ValueError as err:
        raise bad_request(f"Invalid sampling parameters: {err}") from None


def tokenize_prompt(tokenizer, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        ids = list(tokenizer.encode(prompt))
        if not ids:
            raise bad_request("The prompt is empty; send at least one character", "prompt")
        return ids
    vocab = len(tokenizer)
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"Prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
    return list(prompt)


def tokenize_chat(tokenizer, req: ChatCompletionRequest) -> list[int]:
    """Messages through the model's own chat template (the template adds BOS, so no special tokens again)."""
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request("This model has no chat template (tokenizer_config.json 'chat_template'); use "
                          "/v1/completions with a plain prompt instead", "messages")
    messages = [{**m.model_dump(exclude={"content"}), "content": m.text()} for m in req.messages]
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # jinja errors from the model's template (e.g. roles it does not allow)
        raise bad_request(f"The model's chat template rejected these messages: {err}".splitlines()[0],
                          "messages") from None
    return list(tokenizer.encode(text, add_special_tokens=False))


def resolve_max_tokens(prompt_len: int, max_tokens: int | None, max_model_len: int, param: str) -> int:
    """OpenAI's context-length rule: prompt + completion must fit; no max_tokens means 'the rest of the context'."""
    if max_tokens is None:
        if prompt_len >= max_model_len:
            raise _too_long(prompt_len, 0, max_model_len, param)
        return max_model_len - prompt_len
    if prompt_len + max_tokens > max_model_len:
        raise _too_long(prompt_len, max_tokens, max_model_len, param)
    return max_tokens


def _too_long(prompt_len: int, max_tokens: int, max_model_len: int, param: str) -> APIError:
    return bad_request(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                       f"{prompt_len + max_tokens} tokens ({prompt_len} in the {param}, {max_tokens} in the "
                       f"completion). Please reduce the length of the {param} or completion.",
                       param, "context_length_exceeded")


def finish_reason(reason: str | None) -> str | None:
    # The engine's "abort" never reaches a client as a finish reason: an aborted request is reported as an error.
    return reason if reason in (None, "stop", "length") else "stop"


@dataclass
class _Choice:
    """Per-choice progress through the cumulative outputs: how much text / how many tokens were already sent."""

    sent_text: int = 0
    sent_tokens: int = 0
    finish: str | None = None


def engine_error(err: Exception) -> APIError:
    """The HTTP error for an exception out of the engine: its BadInputError is the client's fault (400),
    a stopped engine is 503, anything else a 500 that says what happened."""
    if isinstance(err, APIError):
        return err
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, ValueError):  # BadInputError is a ValueError
        return bad_request(msg)
    if isinstance(err, OnecardError):
        return APIError(503, f"The engine cannot run this request: {msg}", "server_error", None, "engine_unavailable")
    return APIError(500, f"Engine error: {type(err).__name__}: {msg}", "server_error", None, "internal_error")


@dataclass
class Generation:
    """One HTTP request's worth of engine requests (one per prompt, each with ``n`` choices).

    ``start()`` submits them and waits for each one's first output, so a request
    the engine rejects becomes an HTTP error before any byte of a stream is
    sent; ``updates()`` then yields every cumulative output and, however it is
    left, aborts what has not finished.
    """

    engine: object
    metrics: ServerMetrics
    prompts: list[list[int]]
    params: object
    request_id: str
    n: int
    t_arrival: float = field(default_factory=time.perf_counter)
    finals: dict[int, object] = field(default_factory=dict)
    _streams: list = field(default_factory=list)
    _first: list = field(default_factory=list)
    _pending: set[str] = field(default_factory=set)
    _t_last: float | None = None
    _tokens_seen: dict[tuple[int, int], int] = field(default_factory=dict)

    def engine_id(self, i: int) -> str:
        return f"{self.request_id}-{i}"

    async def start(self) -> None:
        self._streams = [self.engine.generate(p, self.params, self.engine_id(i)) for i, p in enumerate(self.prompts)]
        self._pending = {self.engine_id(i) for i in range(len(self.prompts))}
        try:
            firsts = await asyncio.gather(*(s.__anext__() for s in self._streams), return_exceptions=True)
        except BaseException:  # cancelled while waiting (client gone during prefill)
            await self.close("cancelled")
            raise
        errors = [f for f in firsts if isinstance(f, BaseException)]
        if errors:
            await self.close(None)
            err = errors[0]
            raise engine_error(err) if isinstance(err, Exception) else err
        self.metrics.prompt_tokens.inc(sum(len(p) for p in self.prompts))
        for i, out in enumerate(firsts):
            self._observe(i, out)
        self._first = list(firsts)

    def first_output(self, i: int):
        """Prompt i's first output (``start()`` waited for it): its prefill's results, e.g. prompt logprobs."""
        return self._first[i]

    async def updates(self) -> AsyncIterator[tuple[int, object]]:
        """(prompt index, cumulative RequestOutput) from the first to the finished one of every prompt."""
        finished_ok = False
        try:
            for i, out in enumerate(self._first):
                yield i, out
            if len(self._streams) == 1:
                async for out in self._streams[0]:
                    self._observe(0, out)
                    yield 0, out
            else:
                async for i, out in self._merged():
                    self._observe(i, out)
                    yield i, out
            finished_ok = True
        except Exception as err:  # the engine stopped mid-request (e.g. shutdown): an HTTP error, not a crash
            raise engine_error(err) from None
        finally:
            await self.close("unfinished" if finished_ok else "cancelled")

    async def _merged(self) -> AsyncIterator[tuple[int, object]]:
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int) -> None:
            try:
                async for out in self._streams[i]:
                    await queue.put((i, out))
            except Exception as err:  # surfaced in the consumer below
                await queue.put((i, err))
            finally:
                await queue.put((i, done))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(self._streams)) if not self._first[i].finished]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*tasks, return_exceptions=True)

    def _observe(self, i: int, out) -> None:
        t = time.perf_counter()
        new = 0
        for c in out.outputs:
            key = (i, c.index)
            new_c = len(c.token_ids) - self._tokens_seen.get(key, 0)
            self._tokens_seen[key] = len(c.token_ids)
            new = max(new, new_c)
            self.metrics.generation_tokens.inc(max(new_c, 0))
        if new > 0:
            if self._t_last is None:
                self.metrics.ttft.observe(t - self.t_arrival)
                for _ in range(new - 1):
                    self.metrics.itl.observe(0.0)
            else:
                for _ in range(new):
                    self.metrics.itl.observe((t - self._t_last) / new)
            self._t_last = t
        if out.finished:
            self._pending.discard(self.engine_id(i))
            self.finals[i] = out
            if len(self.finals) == len(self.prompts):
                self.metrics.e2e.observe(t - self.t_arrival)

    async def close(self, reason: str | None) -> None:
        """Abort every unfinished engine request (counted under ``reason``) and close the engine streams."""
        # Shielded: when starlette/uvicorn cancels the handler (client gone, shutdown timeout) any plain await
        # here would be cancelled too, and the KV blocks of these requests would leak.
        with anyio.CancelScope(shield=True):
            for rid in list(self._pending):
                try:
                    await self.engine.abort(rid)
                except Exception as err:  # already finished/unknown: nothing left to free
                    log.debug("abort %s: %s", rid, err)
                if reason is not None:
                    self.metrics.aborted.labels(reason).inc()
            self._pending.clear()
            for stream in self._streams:
                try:
                    await stream.aclose()
                except RuntimeError as err:  # still running in a task being cancelled; it ends with that task
                    log.debug("closing an engine stream: %s", err)

    def usage(self) -> Usage:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.token_ids) for o in self.finals.values() for c in o.outputs)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def check_not_aborted(self) -> None:
        for out in self.finals.values():
            if any(c.finish_reason == "abort" for c in out.outputs):
                raise APIError(503, "The request was aborted by the server (shutting down); retry on another "
                                    "replica or after restart", "server_error", None, "request_aborted")


# ---- token text for logprobs -------------------------------------------------------------------------------------


def _token_text(tokenizer, tid: int) -> str:
    return tokenizer.decode([tid])


def _completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]] | None, top: int,
                         offset: int) -> CompletionLogprobs:
    lp = CompletionLogprobs()
    for tid, dist in zip(token_ids, logprobs or []):
        text = _token_text(tokenizer, tid)
        lp.tokens.append(text)
        lp.token_logprobs.append(dist.get(tid))
        best = sorted(dist.items(), key=lambda kv: -kv[1])[:top]
        lp.top_logprobs.append({_token_text(tokenizer, t): v for t, v in best} if top else None)
        lp.text_offset.append(offset)
        offset += len(text)
    return lp


def _prompt_logprobs(tokenizer, out, top: int) -> CompletionLogprobs:
    """The prompt tokens' entries of OpenAI's echo + logprobs shape (None for the first: nothing predicts it)."""
    ids, dists = out.prompt_token_ids, out.prompt_logprobs
    lp = _completion_logprobs(tokenizer, ids[1:], dists[1:], top, len(_token_text(tokenizer, ids[0])))
    lp.tokens.insert(0, _token_text(tokenizer, ids[0]))
    lp.token_logprobs.insert(0, None)
    lp.top_logprobs.insert(0, None)
    lp.text_offset.insert(0, 0)
    return lp


def _with_prompt(tokenizer, out, top: int, output: CompletionLogprobs) -> CompletionLogprobs:
    """Echo + logprobs: the prompt's entries, then the output's."""
    lp = _prompt_logprobs(tokenizer, out, top)
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        getattr(lp, key).extend(getattr(output, key))
    return lp


def _chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]] | None,
                   top: int) -> ChoiceLogprobs:
    content = []
    for tid, dist in zip(token_ids, logprobs or []):
        text = _token_text(tokenizer, tid)
        best = sorted(dist.items(), key=lambda kv: -kv[1])[:top]
        content.append(TokenLogprob(
            token=text, logprob=dist.get(tid, float("-inf")), bytes=list(text.encode()),
            top_logprobs=[TopLogprob(token=(s := _token_text(tokenizer, t)), logprob=v, bytes=list(s.encode()))
                          for t, v in best]))
    return ChoiceLogprobs(content=content)


# ---- responses ------------------------------------------------------------------------------------------------------


async def completion_response(gen: Generation, req: CompletionRequest, tokenizer, model: str,
                              prompt_texts: list[str]) -> CompletionResponse:
    async with aclosing(gen.updates()) as updates:
        async for _ in updates:
            pass
    gen.check_not_aborted()
    choices = []
    for i in range(len(gen.prompts)):
        for c in gen.finals[i].outputs:
            text = (prompt_texts[i] + c.text) if req.echo else c.text
            lp = (_completion_logprobs(tokenizer, c.token_ids, c.logprobs, req.logprobs, len(prompt_texts[i]))
                  if req.logprobs is not None else None)
            if lp is not None and req.echo:  # the prompt's tokens first (the first has no logprob), then the output's
                lp = _with_prompt(tokenizer, gen.finals[i], req.logprobs, lp)
            choices.append(CompletionChoice(index=i * gen.n + c.index, text=text, logprobs=lp,
                                            finish_reason=finish_reason(c.finish_reason)))
    return CompletionResponse(id=gen.request_id, created=now(), model=model, choices=choices, usage=gen.usage())


@dataclass
class _Delta:
    """What is new in one choice since the last chunk."""

    prompt_index: int
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    text_offset: int  # characters of this choice already sent
    finish_reason: str | None


def held_back(text: str, stops: list[str] | None) -> int:
    """Characters at the end of ``text`` that could be the start of a stop string: not streamed yet, because the
    engine trims a stop string from the text once it is complete, and streamed text cannot be taken back."""
    held = 0
    for s in stops or ():
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held


async def _deltas(gen: Generation) -> AsyncIterator[list[_Delta]]:
    """Per engine update, the choices that have new text, tokens or a finish reason; raises APIError if aborted."""
    state: dict[tuple[int, int], _Choice] = {}
    stops = getattr(gen.params, "stop", None)
    async with aclosing(gen.updates()) as updates:
        async for i, out in updates:
            deltas = []
            for c in out.outputs:
                st = state.setdefault((i, c.index), _Choice())
                reason = finish_reason(c.finish_reason) if c.finish_reason != "abort" else None
                if st.finish is not None or (len(c.token_ids) == st.sent_tokens and reason is None):
                    continue
                end = len(c.text) if reason is not None else max(st.sent_text, len(c.text) - held_back(c.text, stops))
                deltas.append(_Delta(i, c.index, c.text[st.sent_text:end], c.token_ids[st.sent_tokens:],
                                     None if c.logprobs is None else c.logprobs[st.sent_tokens:], st.sent_text,
                                     reason))
                st.sent_text, st.sent_tokens, st.finish = end, len(c.token_ids), reason
            if deltas:
                yield deltas
    gen.check_not_aborted()


async def _sse_body(events: AsyncIterator[str], usage_event) -> AsyncIterator[str]:
    """The SSE framing shared by both endpoints: events, an error event if the engine gave up, usage, [DONE]."""
    try:
        async with aclosing(events) as it:
            async for event in it:
                yield event
    except APIError as err:  # headers are already sent: the error goes in the stream, as OpenAI does
        yield f"data: {json.dumps(err.body())}\n\n"
    else:
        if usage_event is not None:
            yield usage_event()
    yield "data: [DONE]\n\n"


class ChunkWriter:
    """SSE events of one stream, with the per-request constant part serialized once.

    This is the server's hot path (one event per token per stream: ~10k/s at 256
    streams on a GPU, on the same GIL as the engine's step loop), so chunks are
    plain dicts through ``json.dumps`` - about half the cost of building
    pydantic models; tests check every event against ``CompletionResponse`` /
    ``ChatCompletionChunk``.
    """

    def __init__(self, request_id: str, object_: str, model: str) -> None:
        self.head = (f'data: {{"id":{json.dumps(request_id)},"object":"{object_}","created":{now()},'
                     f'"model":{json.dumps(model)},"choices":')

    def __call__(self, choices: list[dict], usage: Usage | None = None) -> str:
        tail = usage.model_dump_json() if usage is not None else "null"
        return f'{self.head}{json.dumps(choices, separators=(",", ":"))},"usage":{tail},"system_fingerprint":null}}\n\n'


def completion_stream(gen: Generation, req: CompletionRequest, tokenizer, model: str,
                      prompt_texts: list[str]) -> AsyncIterator[str]:
    chunk = ChunkWriter(gen.request_id, "text_completion", model)

    def logprobs(d: _Delta) -> dict | None:
        if req.logprobs is None:
            return None
        offset = len(prompt_texts[d.prompt_index]) + d.text_offset
        return _completion_logprobs(tokenizer, d.token_ids, d.logprobs, req.logprobs, offset).model_dump()

    def prompt_logprobs(i: int) -> dict | None:  # echo + logprobs: scored by the prefill, before any output
        return _prompt_logprobs(tokenizer, gen.first_output(i), req.logprobs).model_dump() if req.logprobs is not None \
            else None

    async def events() -> AsyncIterator[str]:
        if req.echo:
            yield chunk([{"index": i * gen.n + j, "text": prompt_texts[i], "logprobs": prompt_logprobs(i),
                          "finish_reason": None} for i in range(len(gen.prompts)) for j in range(gen.n)])
        async for deltas in _deltas(gen):
            yield chunk([{"index": d.prompt_index * gen.n + d.index, "text": d.text, "logprobs": logprobs(d),
                          "finish_reason": d.finish_reason} for d in deltas])

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return _sse_body(events(), (lambda: chunk([], gen.usage())) if include_usage else None)


async def chat_response(gen: Generation, req: ChatCompletionRequest, tokenizer, model: str,
                        tool_call_parser: str | None = None) -> ChatCompletionResponse:
    async with aclosing(gen.updates()) as updates:
        async for _ in updates:
            pass
    gen.check_not_aborted()
    top = req.top_logprobs or 0
    choices = []
    for c in gen.finals[0].outputs:
        message, reason = final_message(req, c.text, finish_reason(c.finish_reason), tool_call_parser)
        choices.append(ChatChoice(index=c.index, message=ResponseMessage(**message),
                                  logprobs=_chat_logprobs(tokenizer, c.token_ids, c.logprobs, top) if req.logprobs
                                  else None, finish_reason=reason))
    return ChatCompletionResponse(id=gen.request_id, created=now(), model=model, choices=choices, usage=gen.usage())


def final_message(req: ChatCompletionRequest, text: str, reason: str | None,
                  tool_call_parser: str | None) -> tuple[dict, str | None]:
    """A finished answer as the message's fields and its finish reason: tool calls (a constrained call, or calls
    the parser reads back under tool_choice 'auto'; finish_reason 'tool_calls'), else the text as content."""
    calls: list[tuple[str, dict]] = []
    content: str | None = text
    if reason == "stop" and req.called_tools():  # the grammar guarantees {"name", "arguments"}
        obj = json.loads(text)
        content, calls = None, [(obj["name"], obj["arguments"])]
    elif reason == "stop" and req.parses_tool_calls():
        content, calls = parse_tool_calls(tool_call_parser, text, {t.function.name for t in req.tools})
    if not calls:
        return {"content": text}, reason
    return {"content": content, "tool_calls": [ToolCall(id=new_id("call"), function=FunctionCall(
        name=name, arguments=json.dumps(args))) for name, args in calls]}, "tool_calls"


def chat_stream(gen: Generation, req: ChatCompletionRequest, tokenizer, model: str,
                tool_call_parser: str | None = None) -> AsyncIterator[str]:
    chunk = ChunkWriter(gen.request_id, "chat.completion.chunk", model)
    top = req.top_logprobs or 0

    def logprobs(d: _Delta) -> dict | None:
        return _chat_logprobs(tokenizer, d.token_ids, d.logprobs, top).model_dump() if req.logprobs else None

    async def events() -> AsyncIterator[str]:
        yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for j in range(gen.n)])
        # with tools the answer may be a call: sent whole (text, tokens and logprobs) at the end
        held = {j: [] for j in range(gen.n)} if req.called_tools() or req.parses_tool_calls() else None
        async for deltas in _deltas(gen):
            if held is None:
                yield chunk([{"index": d.index, "delta": {"content": d.text} if d.text else {},
                              "logprobs": logprobs(d), "finish_reason": d.finish_reason} for d in deltas])
                continue
            out = []
            for d in deltas:
                held[d.index].append(d)
                if d.finish_reason is not None:
                    parts = held[d.index]
                    whole = replace(d, text="".join(p.text for p in parts),
                                    token_ids=[t for p in parts for t in p.token_ids],
                                    logprobs=None if d.logprobs is None else [x for p in parts for x in p.logprobs])
                    message, reason = final_message(req, whole.text, d.finish_reason, tool_call_parser)
                    if "tool_calls" in message:
                        message["tool_calls"] = [{"index": k, **call.model_dump()}
                                                 for k, call in enumerate(message["tool_calls"])]
                    out.append({"index": d.index, "delta": message, "logprobs": logprobs(whole),
                                "finish_reason": reason})
            if out:
                yield chunk(out)

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return _sse_body(events(), (lambda: chunk([], gen.usage())) if include_usage else None)
