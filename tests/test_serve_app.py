"""In-process server tests against a fake engine: OpenAI shapes, errors, auth, readiness, abort-on-disconnect.

The real engine + real uvicorn subprocess are covered in test_serve_server.py;
here every behaviour that depends only on the server is pinned down quickly
and deterministically (the fake engine's KV blocks and abort log are visible).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

openai = pytest.importorskip("openai")  # the GPU machine lacks the serve extras: skip, don't error
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from serve_fake_engine import FakeEngine

MODEL = "tiny"


@pytest.fixture(scope="module")
def tokenizer(random_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(random_checkpoint("llama-2-7b"))


def make_client(engine, api_key=None, **kw) -> TestClient:
    from onecard.serve.app import build_app

    return TestClient(build_app(engine, MODEL, api_key, gpu_metrics=False, **kw), raise_server_exceptions=False)


@pytest.fixture
def engine(tokenizer):
    return FakeEngine(tokenizer)


@pytest.fixture
def client(engine):
    with make_client(engine) as c:
        yield c


@pytest.fixture
def oai(client):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client, max_retries=0)


def test_completion_shape_and_usage(oai, engine):
    r = oai.completions.create(model=MODEL, prompt="def f(x):", max_tokens=5, seed=1)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens == len(engine.tokenizer.encode("def f(x):"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_sampling_fields_reach_the_engine(oai, engine):
    oai.completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=0.7, top_p=0.9, seed=5, n=2,
                           presence_penalty=0.5, frequency_penalty=-0.5, stop=["\n\n"],
                           extra_body={"top_k": 7, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2})
    p = engine.seen_params[-1]
    assert (p.temperature, p.top_p, p.seed, p.n, p.max_tokens) == (0.7, 0.9, 5, 2, 3)
    assert (p.presence_penalty, p.frequency_penalty, p.stop) == (0.5, -0.5, ["\n\n"])
    assert (p.top_k, p.min_p, p.repetition_penalty, p.min_tokens) == (7, 0.05, 1.1, 2)
    oai.completions.create(model=MODEL, prompt="x", max_tokens=3, logit_bias={"5": -100, "7": 2.5})
    assert engine.seen_params[-1].logit_bias == {5: -100, 7: 2.5}


def test_echo_with_logprobs_scores_the_prompt(oai, engine):
    """Echo + logprobs (how evaluation harnesses score a text): the prompt's tokens come first, the first without
    a logprob, then the output's; streamed, the prompt's come in the echo chunk."""
    prompt = "def f(x): return x"
    n_prompt = len(engine.tokenizer.encode(prompt))
    r = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=2, echo=True, logprobs=1)
    assert engine.seen_params[-1].prompt_logprobs == 1
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n_prompt + 2
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:n_prompt] == [-1.0] * (n_prompt - 1) and lp.token_logprobs[n_prompt:] == [-0.5] * 2
    assert r.choices[0].text.startswith(prompt)
    chunks = list(oai.completions.create(model=MODEL, prompt=prompt, max_tokens=2, echo=True, logprobs=1,
                                         stream=True))
    first, rest = chunks[0].choices[0].logprobs, [c.choices[0].logprobs for c in chunks[1:] if c.choices]
    assert first.token_logprobs == [None] + [-1.0] * (n_prompt - 1) and chunks[0].choices[0].text == prompt
    assert [v for lp in rest if lp for v in lp.token_logprobs] == [-0.5] * 2


def test_tool_choice_auto_reads_calls_back_with_a_parser(engine):
    """--tool-call-parser hermes: an answer holding a call comes back as tool_calls (streamed whole at the end),
    one without stays content."""
    tools = [{"type": "function", "function": {"name": "get_weather",
                                               "parameters": {"type": "object", "properties": {"city": {}}}}}]
    msgs = [{"role": "user", "content": "weather?"}]
    with make_client(engine, tool_call_parser="hermes") as c:
        oai = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=c, max_retries=0)
        engine.reply = 'Sure.<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
        r = oai.chat.completions.create(model=MODEL, messages=msgs, tools=tools, max_tokens=100)
        call = r.choices[0].message.tool_calls[0]
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content == "Sure."
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
        assert engine.seen_params[-1].structured is None  # auto: the model's own text, not constrained
        chunks = list(oai.chat.completions.create(model=MODEL, messages=msgs, tools=tools, max_tokens=100,
                                                  stream=True, logprobs=True))
        streamed = [tc for ch in chunks for ch_c in ch.choices for tc in (ch_c.delta.tool_calls or [])]
        assert [tc.function.name for tc in streamed] == ["get_weather"]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        n_reply = len(engine.tokenizer.encode(engine.reply, add_special_tokens=False))
        assert len(chunks[-1].choices[0].logprobs.content) == n_reply  # the held answer's logprobs, not dropped
        engine.reply = "It is sunny."
        r = oai.chat.completions.create(model=MODEL, messages=msgs, tools=tools, max_tokens=100)
        assert r.choices[0].message.content == "It is sunny." and r.choices[0].message.tool_calls is None
        assert r.choices[0].finish_reason == "stop"


def test_structured_output_fields_reach_the_engine(oai, engine):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    msgs = [{"role": "user", "content": "a"}]
    oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, response_format={"type": "json_object"})
    assert engine.seen_params[-1].structured == ("json_object", True)
    oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert engine.seen_params[-1].structured == ("json_schema", schema)
    oai.completions.create(model=MODEL, prompt="x", max_tokens=3, extra_body={"guided_regex": r"\d+"})
    assert engine.seen_params[-1].structured == ("regex", r"\d+")
    oai.completions.create(model=MODEL, prompt="x", max_tokens=3, extra_body={"guided_choice": ["yes", "no"]})
    assert engine.seen_params[-1].structured == ("choice", ["yes", "no"])


@pytest.mark.parametrize("body,words", [
    ({"response_format": {"type": "yaml"}}, "use text, json_object or json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "needs"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "one structured output constraint"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "--tool-call-parser"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "names no tool"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "cannot be combined"),
])
def test_bad_structured_output_requests_are_400(client, body, words):
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "a"}],
                                                   "max_tokens": 3, **body})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_batch_prompts_and_n(oai):
    r = oai.completions.create(model=MODEL, prompt=["a", "b b"], max_tokens=2, n=3, seed=0)
    assert sorted(c.index for c in r.choices) == list(range(6))
    assert r.usage.completion_tokens == 12


def test_chat_uses_template_and_streams_with_usage(oai, engine):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    full = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, seed=3)
    templated = engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert full.usage.prompt_tokens == len(engine.tokenizer.encode(templated, add_special_tokens=False))
    assert full.choices[0].message.role == "assistant" and full.object == "chat.completion"
    chunks = list(oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, seed=3, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content  # same seed, same tokens, streamed whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_raw_sse_ends_with_done(client):
    with client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 3,
                                                        "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_logprobs_shapes(oai):
    r = oai.completions.create(model=MODEL, prompt="a", max_tokens=4, logprobs=2, seed=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(v == -0.5 for v in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    c = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}], max_tokens=3,
                                    logprobs=True, top_logprobs=2, seed=0)
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(t.logprob == -0.5 and len(t.top_logprobs) <= 2 for t in content)


@pytest.mark.parametrize("body,param,code", [
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", None),
    ({"prompt": "a", "temperature": 3}, "temperature", None),
    ({"prompt": "a", "bogus_field": 1}, "bogus_field", "extra_forbidden"),
    ({"prompt": "a", "logit_bias": {"x": 1.0}}, None, None),
    ({"prompt": "a", "logit_bias": {"5": 101}}, None, None),
    ({"prompt": "a " * 200, "max_tokens": 4}, "prompt", "context_length_exceeded"),
    ({"prompt": "a", "max_tokens": 500}, "prompt", "context_length_exceeded"),
    ({"prompt": [10**9]}, "prompt", None),
    ({"prompt": "a", "model": "gpt-4"}, "model", "model_not_found"),
])
def test_bad_requests_are_400_in_openai_shape(client, body, param, code):
    r = client.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["message"] and "\n" not in err["message"]
    if param:
        assert err["param"] == param
    if code:
        assert err["code"] == code


def test_openai_client_raises_bad_request(oai):
    with pytest.raises(openai.BadRequestError) as exc:
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "a"}])
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="context length"):
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x " * 300}])


def test_invalid_json_and_unknown_route(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_api_key_guards_everything_but_health(engine):
    with make_client(engine, api_key="sekret") as c:
        assert c.get("/health").status_code == 200
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions")):
            r = c.request(method, path, json={"model": MODEL, "prompt": "a"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = c.request(method, path, json={"model": MODEL, "prompt": "a"},
                          headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401
        ok = c.get("/v1/models", headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == MODEL
        oai = openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=c, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            oai.models.list()


def test_503_while_engine_loads(tokenizer):
    gate = threading.Event()
    engine = FakeEngine(tokenizer)

    def factory():
        gate.wait(10)
        return engine

    from onecard.serve.app import build_app

    with TestClient(build_app(model_name=MODEL, engine_factory=factory, gpu_metrics=False)) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "a"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_not_ready"
        assert c.get("/health").status_code == 503
        assert "onecard_engine_ready 0.0" in c.get("/metrics").text
        gate.set()
        deadline = time.monotonic() + 10
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "engine never became ready"
            time.sleep(0.02)
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2}).status_code == 200
    assert engine.shutdown_called


def test_engine_load_failure_is_reported(tokenizer):
    from onecard.serve.app import build_app

    def factory():
        raise RuntimeError("weights are corrupt")

    with TestClient(build_app(model_name=MODEL, engine_factory=factory, gpu_metrics=False)) as c:
        deadline = time.monotonic() + 10
        while "corrupt" not in c.get("/health").text:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert c.get("/health").status_code == 503


def test_metrics_count_requests_tokens_and_latency(client, oai):
    oai.completions.create(model=MODEL, prompt="a", max_tokens=4)
    text = client.get("/metrics").text
    assert 'onecard_requests_total{route="/v1/completions",status="200"} 1.0' in text
    assert "onecard_generation_tokens_total 4.0" in text
    assert "onecard_time_to_first_token_seconds_count 1.0" in text
    assert "onecard_inter_token_latency_seconds_count 3.0" in text
    assert "onecard_kv_cache_blocks_used 0.0" in text and "onecard_num_requests_running 0.0" in text


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_stream_disconnect_aborts_and_frees_blocks(tokenizer):
    engine = FakeEngine(tokenizer, step_s=0.01, max_model_len=4096)
    with make_client(engine) as c:
        with c.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2000,
                                                       "stream": True}) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(g.startswith("data: {") for g in got)
            assert engine.stats()["kv_blocks_used"] > 0
        deadline = time.monotonic() + 10
        while engine.stats()["kv_blocks_used"]:
            assert time.monotonic() < deadline, "KV blocks leaked after disconnect"
            time.sleep(0.02)
        assert len(engine.aborted) == 1
        text = c.get("/metrics").text
        assert _metric(text, "onecard_kv_cache_blocks_used") == 0
        assert 'onecard_requests_aborted_total{reason="cancelled"} 1.0' in text


def test_nonstream_disconnect_aborts(tokenizer):
    """A client that gives up on a long non-streaming request must not keep its sequence running."""
    from onecard.serve.app import build_app

    engine = FakeEngine(tokenizer, step_s=0.01, max_model_len=4096)
    app = build_app(engine, MODEL, gpu_metrics=False)

    async def run():
        body = json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 3000}).encode()
        sent = asyncio.Event()
        msgs = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if msgs:
                return msgs.pop(0)
            await asyncio.sleep(0.2)  # the client hangs up while the generation runs
            sent.set()
            return {"type": "http.disconnect"}

        statuses = []

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
                 "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 80), "scheme": "http", "root_path": ""}
        await asyncio.wait_for(app(scope, receive, send), 10)
        return statuses

    statuses = asyncio.run(run())
    assert statuses == [499]
    assert engine.aborted and engine.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("text,stops,held", [
    ("hello wor", ["world"], 3), ("hello", ["world"], 0), ("abcab", ["abc"], 2), ("x\n", ["\n\n", "zz"], 1),
    ("anything", None, 0), ("endw", ["w", "wo"], 1),
])
def test_held_back_is_the_longest_stop_prefix_at_the_end(text, stops, held):
    from onecard.serve.completions import held_back

    assert held_back(text, stops) == held


@pytest.mark.parametrize("route,body,schema", [
    ("/v1/completions", {"prompt": ["a", "b"], "n": 2, "logprobs": 2, "echo": False}, "CompletionResponse"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "n": 2, "logprobs": True,
                              "top_logprobs": 1}, "ChatCompletionChunk"),
])
def test_every_stream_event_matches_the_openai_schema(client, route, body, schema):
    """The hot-path chunk writer builds JSON by hand; each event must still be exactly the protocol model."""
    from onecard.serve import protocol

    model = getattr(protocol, schema)
    payload = {"model": MODEL, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}, **body}
    with client.stream("POST", route, json=payload) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parsed = [model.model_validate_json(e) for e in events[:-1]]
    assert all(json.loads(e).keys() == json.loads(p.model_dump_json()).keys() for e, p in zip(events, parsed))
    assert len({p.id for p in parsed}) == 1 and parsed[-1].usage.completion_tokens == 4 * (4 if "prompt" in body else 2)
    finishes = [c for p in parsed for c in p.choices if c.finish_reason]
    assert len(finishes) == (4 if "prompt" in body else 2) and all(c.logprobs is not None for c in finishes)
