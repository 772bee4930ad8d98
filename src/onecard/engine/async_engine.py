"""``AsyncEngine``: the engine for servers. The step loop runs in a background thread; asyncio code streams.

    engine = AsyncEngine("path/to/model")
    async for out in engine.generate("Hi", SamplingParams(max_tokens=8), request_id="r1"):
        print(out.outputs[0].text)          # cumulative; the last one has finished=True

Requests are validated in the caller's thread (a bad one raises at once and
never reaches the batch), then handed to the loop thread through a queue; the
loop adds them between steps, so the event loop never waits for a GPU step.
Leaving the ``async for`` early (client gone) aborts the request and frees its
KV blocks.

The hand-off back is one ``call_soon_threadsafe`` per engine step and event
loop, carrying every output of that step (a wake-up per request per step cost
hundreds of self-pipe writes and loop wake-ups per step at serving batch
sizes, all on the GIL the step loop needs). The engine thread never waits on
the event loop. Outputs are cumulative, so each request keeps only its newest
one: a consumer that falls behind (slow client, busy event loop) gets the
latest state with several new tokens instead of a backlog of stale copies.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from onecard.engine.config import EngineConfig
from onecard.engine.llm import build_engine
from onecard.engine.outputs import RequestOutput
from onecard.engine.sampling_params import SamplingParams
from onecard.errors import BadInputError, OnecardError

log = logging.getLogger(__name__)


class EngineDeadError(OnecardError):
    """The engine's step loop stopped (shut down or crashed); requests can no longer run."""


class RequestStream:
    """One request's outputs on its event loop: the newest cumulative output (or the error that ended it).

    Touched only on ``loop`` (the engine thread reaches it through ``call_soon_threadsafe``), so no lock.
    """

    __slots__ = ("loop", "latest", "error", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.latest: RequestOutput | None = None
        self.error: BaseException | None = None
        self.waiter: asyncio.Future | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            self.error = item
        else:
            self.latest = item  # cumulative: replaces an unread older output without losing anything
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> RequestOutput:
        """The newest output not yet taken; the error once every output before it was taken."""
        while self.latest is None:
            if self.error is not None:
                raise self.error
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        out, self.latest = self.latest, None
        return out


def dispatch(batch: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    """Runs on the event loop: one engine step's outputs into their requests' streams."""
    for stream, item in batch:
        stream.put(item)


class AsyncEngine:
    def __init__(self, model: str | Path, **kwargs) -> None:
        self.config = EngineConfig(model, **kwargs)
        self.engine = build_engine(self.config)
        self.tokenizer = self.engine.tokenizer
        self.engine.incremental_text = True
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", rid, text/ids, params) | ("abort", rid)
        self._streams: dict[str, RequestStream] = {}
        self._streams_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._stats = self.engine.stats()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="onecard-engine", daemon=True)
        self._thread.start()

    @property
    def max_model_len(self) -> int:
        """Longest prompt + output a request may have (the server checks requests against it)."""
        return self.config.max_model_len

    @property
    def ready(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set() and self._error is None

    def stats(self) -> dict:
        return dict(self._stats, ready=self.ready)

    # ---- asyncio side ------------------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams | None,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request, the last with ``finished=True``; a consumer slower than the engine
        sees only the newest output (it holds every token so far), so it may skip intermediate ones."""
        if not self.ready:
            raise EngineDeadError(f"the engine is not running ({self._error or 'shut down'}); restart the server")
        self.engine.validate(prompt, sampling_params)  # raises BadInputError here, in the caller
        stream = RequestStream(asyncio.get_running_loop())
        with self._streams_lock:
            if request_id in self._streams:
                raise BadInputError(f"request_id '{request_id}' is already in use; pass a unique id")
            self._streams[request_id] = stream
        self._inbox.put(("add", request_id, prompt, sampling_params))
        self._wake.set()
        finished = False
        try:
            while not finished:
                out = await stream.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self._inbox.put(("abort", request_id))
                self._wake.set()
            with self._streams_lock:
                self._streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (its stream ends with finish_reason 'abort')."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop after the current step; unfinished requests end with EngineDeadError."""
        self._stop.set()
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)

    # ---- loop thread -------------------------------------------------------------------------------------------
    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand ``items`` to their streams: one ``call_soon_threadsafe`` per event loop, never a wait on one."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._streams_lock:
            for rid, item in items:
                stream = self._streams.get(rid)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(dispatch, batch)
            except RuntimeError:  # that event loop is closed; nobody is left to read these
                pass

    def _drain_inbox(self) -> list[tuple[str, RequestOutput | BaseException]]:
        """Add and abort what the event loop sent; returns what the affected requests must be told."""
        told: list[tuple[str, RequestOutput | BaseException]] = []
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return told
            if msg[0] == "add":
                _, rid, prompt, params = msg
                try:
                    self.engine.add_request(rid, prompt, params)
                except Exception as exc:  # validated already; anything here is reported to that request only
                    told.append((rid, exc))
            else:
                out = self.engine.abort_request(msg[1])
                if out is not None:
                    told.append((msg[1], out))

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                told = self._drain_inbox()
                if self.engine.has_unfinished_requests():
                    told += [(out.request_id, out) for out in self.engine.step()]
                    self._stats = self.engine.stats()
                    if told:
                        self._deliver(told)
                else:
                    if told:
                        self._deliver(told)
                    self._stats = self.engine.stats()
                    self._wake.wait(0.1)
                    self._wake.clear()
        except BaseException as exc:  # a crashed step must not hang every client
            log.exception("engine step loop crashed")
            self._error = exc
        finally:
            err = EngineDeadError(f"the engine stopped ({type(self._error).__name__ if self._error else 'shut down'}); "
                                  "retry after the server restarts")
            with self._streams_lock:
                rids = list(self._streams)
            for rid in rids:
                self.engine.abort_request(rid)
            self._deliver([(rid, err) for rid in rids])
