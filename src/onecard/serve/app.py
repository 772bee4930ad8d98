"""The FastAPI app: OpenAI routes, API-key check, OpenAI-shaped errors, /health and /metrics.

``build_app`` takes either a ready engine or an ``engine_factory``; with a
factory the app starts answering at once (``/health`` and every ``/v1`` route
say 503 until the model is loaded), which is what load balancers and
orchestrators expect from a server whose start takes minutes.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from onecard.errors import BadInputError
from onecard.serve.completions import (
    Generation,
    chat_response,
    chat_stream,
    completion_response,
    completion_stream,
    resolve_max_tokens,
    sampling_params,
    tokenize_chat,
    tokenize_prompt,
)
from onecard.serve.engine_info import engine_options
from onecard.serve.errors import (
    APIError,
    bad_request,
    not_ready,
    unauthorized,
    unknown_model,
)
from onecard.serve.metrics import ServerMetrics
from onecard.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    new_id,
    now,
)
from onecard.serve.rag_ask import RagAskRequest, rag_answer, rag_disabled
from onecard.serve.vision_engine import chat_prompt

log = logging.getLogger(__name__)

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/rag/ask", "/health", "/metrics")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _CountRequests:
    """Pure ASGI middleware counting requests by route and status (BaseHTTPMiddleware would buffer streams)."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(route, str(status)).inc()


def build_app(engine=None, model_name: str = "model", api_key: str | None = None, *,
              engine_factory: Callable[[], object] | None = None, shutdown_timeout: float = 30.0,
              gpu_metrics: bool = True, rag_db: str | Path | None = None,
              tool_call_parser: str | None = None) -> FastAPI:
    """The server app over ``engine`` (an AsyncEngine), or over the one ``engine_factory`` builds at startup.

    ``rag_db``: a ``onecard rag index`` database; enables ``POST /v1/rag/ask``. ``tool_call_parser``: how the
    model writes tool calls (``tool_parsers.PARSERS``); enables ``tool_choice`` ``auto``.
    """
    if (engine is None) == (engine_factory is None):
        raise BadInputError("build_app needs exactly one of engine= (a ready AsyncEngine) or engine_factory=")
    if api_key is not None and not api_key.strip():
        raise BadInputError("api_key must be a non-empty string (or None for no authentication)")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        load_task = None
        if engine_factory is not None:
            load_task = asyncio.create_task(_load(app, engine_factory))
        try:
            yield
        finally:
            if load_task is not None and not load_task.done():
                load_task.cancel()
            eng = app.state.engine
            if eng is not None:
                await eng.shutdown(shutdown_timeout)

    app = FastAPI(title="onecard", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.load_error = None
    app.state.model_name = model_name
    app.state.created = now()
    metrics = ServerMetrics(lambda: app.state.engine, gpu=gpu_metrics)
    app.state.metrics = metrics
    app.add_middleware(_CountRequests, metrics=metrics)

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise unauthorized()

    def ready_engine(request: Request):
        eng = request.app.state.engine
        if request.app.state.load_error is not None:
            raise not_ready(f"the engine failed to load: {request.app.state.load_error}")
        if eng is None or not eng.ready:
            raise not_ready()
        return eng

    def check_model(requested: str) -> None:
        if requested != model_name:
            raise unknown_model(requested, model_name)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request").removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            msg = f"Unrecognized request argument supplied: {param}"
        elif first.get("type") == "json_invalid":
            msg = "The request body is not valid JSON"
        elif param:
            msg = f"Invalid value for '{param}': {msg}"
        return bad_request(msg, param, first.get("type")).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        message = f"{request.method} {request.url.path}: {err.detail}"
        return APIError(err.status_code, message, "invalid_request_error", None, code).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception):
        log.exception("internal error on %s", request.url.path)
        return APIError(500, f"Internal server error: {type(err).__name__}: {err}".splitlines()[0],
                        "server_error", None, "internal_error").response()

    @app.get("/health")
    async def health(request: Request):
        if request.app.state.load_error is not None:
            return not_ready(f"the engine failed to load: {request.app.state.load_error}").response()
        eng = request.app.state.engine
        if eng is None or not eng.ready:
            return not_ready().response()
        return {"status": "ok", "model": model_name}

    @app.get("/metrics", dependencies=[Depends(check_key)])
    async def metrics_route():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models(request: Request) -> ModelList:
        eng = request.app.state.engine
        ready = eng is not None and eng.ready
        return ModelList(data=[ModelCard(id=model_name, created=request.app.state.created,
                                         max_model_len=max_model_len(eng) if ready else None,
                                         options=engine_options(eng) if ready else None)])

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(req: CompletionRequest, request: Request):
        eng = ready_engine(request)
        check_model(req.model)
        if getattr(eng, "accepts_images", False):
            raise bad_request(f"The model '{model_name}' is a LLaVA model served through its chat template; send "
                              "/v1/chat/completions requests (text, or with an image_url content part)", "prompt")
        tok = eng.tokenizer
        prompts = [tokenize_prompt(tok, p) for p in req.prompts()]
        max_tokens = min(resolve_max_tokens(len(p), req.max_tokens, max_model_len(eng), "prompt") for p in prompts)
        params = sampling_params(req, max_tokens, req.logprobs, req.logprobs if req.echo else None)
        texts = [p if isinstance(p, str) else tok.decode(p) for p in req.prompts()] if (req.echo or req.logprobs is
                                                                                         not None) else [""] * len(prompts)
        gen = Generation(eng, metrics, prompts, params, new_id("cmpl"), req.n)
        if req.stream:
            await gen.start()
            return StreamingResponse(completion_stream(gen, req, tok, model_name, texts), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return await _until_disconnect(request, gen, lambda: completion_response(gen, req, tok, model_name, texts))

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        t_arrival = time.perf_counter()
        eng = ready_engine(request)
        check_model(req.model)
        if req.parses_tool_calls() and tool_call_parser is None:
            raise bad_request("tool_choice 'auto' (the default with tools: the model decides whether to call) needs "
                              "the server started with --tool-call-parser hermes|llama3_json; or send tool_choice "
                              "'required' or a named function (the output is then constrained to the tools' "
                              "schemas), or 'none'", "tool_choice")
        tok = eng.tokenizer
        llava = req.has_images() or getattr(eng, "accepts_images", False)
        if llava:  # a LLaVA model: image questions and text chats through onecard.vision's model (vision_engine.py)
            prompt = await chat_prompt(eng, [m.model_dump() for m in req.messages], req.has_images(), model_name)
        else:
            prompt = tokenize_chat(tok, req)
        max_tokens = resolve_max_tokens(len(prompt), req.max_new_tokens(), max_model_len(eng), "messages")
        params = sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        if llava:
            try:
                eng.check_params(params)
            except BadInputError as err:
                raise bad_request(str(err)) from None
        gen = Generation(eng, metrics, [prompt], params, new_id("chatcmpl"), req.n, t_arrival)
        if req.stream:
            await gen.start()
            return StreamingResponse(chat_stream(gen, req, tok, model_name, tool_call_parser),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        return await _until_disconnect(request, gen,
                                       lambda: chat_response(gen, req, tok, model_name, tool_call_parser))

    @app.post("/v1/rag/ask", dependencies=[Depends(check_key)])
    async def rag_ask(req: RagAskRequest, request: Request):
        if rag_db is None:
            raise rag_disabled()
        eng = ready_engine(request)
        return await rag_answer(eng, metrics, max_model_len(eng), Path(rag_db), model_name, req)

    return app


def max_model_len(engine) -> int:
    """The engine's context length (``AsyncEngine.config.max_model_len``; a plain attribute on test engines)."""
    value = getattr(engine, "max_model_len", None)
    return value if value is not None else engine.config.max_model_len


async def _load(app: FastAPI, factory: Callable[[], object]) -> None:
    """Build the engine off the event loop so /health can answer 503 meanwhile."""
    try:
        app.state.engine = await asyncio.to_thread(factory)
        on_loaded = getattr(app.state, "on_loaded", None)
        if on_loaded is not None:
            on_loaded()
        log.info("engine ready")
    except Exception as err:
        app.state.load_error = str(err).splitlines()[0] if str(err) else type(err).__name__
        log.error("engine failed to load: %s", app.state.load_error)
        on_fail = getattr(app.state, "on_load_error", None)
        if on_fail is not None:
            on_fail(err)


async def _until_disconnect(request: Request, gen: Generation, respond: Callable[[], Awaitable]):
    """Run a non-streaming generation, cancelling it (and so aborting its engine requests) if the client leaves."""

    async def work():
        await gen.start()
        return await respond()

    task = asyncio.ensure_future(work())

    async def wait_disconnect() -> None:
        while True:
            if (await request.receive())["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()  # the handler itself was cancelled (shutdown timeout): the task aborts its requests
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    # The client is gone; this response is never read but keeps the status honest in the metrics.
    return JSONResponse(APIError(499, "client closed the request", "invalid_request_error").body(), 499)
