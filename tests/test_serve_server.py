"""The real server: ``onecard serve`` (uvicorn) in a subprocess on 127.0.0.1, driven by the real ``openai`` client.

One server per module (the real AsyncEngine on a tiny random-weight Llama),
started once; the last test stops it with SIGTERM.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import time

import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")  # the GPU machine lacks the serve extras: skip, don't error
openai = pytest.importorskip("openai")

from onecard.serve.launch import start_server

MODEL = "tiny"
KEY = "test-key"
ARGS = ("--api-key", KEY, "--served-model-name", MODEL, "--max-model-len", "256", "--max-num-seqs", "16",
        "--shutdown-timeout", "3")
STARTING: list[httpx.Response] = []  # a /v1 request made while /health still said 503 (engine loading)


def probe_while_loading(url: str) -> None:
    if not STARTING:
        STARTING.append(httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "a"},
                                   headers={"Authorization": f"Bearer {KEY}"}, timeout=5))


@pytest.fixture(scope="module")
def model_dir(random_checkpoint):
    return random_checkpoint("llama-2-7b")


@pytest.fixture(scope="module")
def server_proc(model_dir):
    with start_server(model_dir, ARGS, cpu=True, while_loading=probe_while_loading) as srv:
        yield srv.proc, srv.url
    # the SIGTERM test (last in this module) normally stopped it already; either way it must have exited 0
    assert srv.returncode == 0, srv.log_tail()


@pytest.fixture(scope="module")
def server(server_proc):
    return server_proc[1]


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def metric(url: str, name: str, default: float | None = None) -> float:
    """Sum of a metric's samples (all label values); ``default`` when it has none yet (labelled counters)."""
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    values = [float(line.split()[-1]) for line in text.splitlines()
              if line.startswith(name + " ") or line.startswith(name + "{")]
    if not values and default is None:
        raise AssertionError(f"{name} not in /metrics")
    return sum(values) if values else default


def test_503_while_the_engine_loads(server):
    if not STARTING:
        pytest.skip("the engine was ready before the first poll; the in-process test covers 503")
    r = STARTING[0]
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_not_ready"


def test_models_and_health(server, oai):
    assert [m.id for m in oai.models.list().data] == [MODEL]
    assert httpx.get(server + "/health").json()["status"] == "ok"  # no key needed


def test_completion_chat_and_usage(oai):
    r = oai.completions.create(model=MODEL, prompt="def main():", max_tokens=8, seed=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    c = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=8,
                                    seed=0)
    assert c.choices[0].message.role == "assistant" and c.choices[0].finish_reason in ("stop", "length")
    assert c.usage.prompt_tokens > 3


def test_streaming_matches_non_streaming(oai):
    kw = dict(model=MODEL, prompt="import os\n", max_tokens=12, seed=7, temperature=0.8,
              extra_body={"ignore_eos": True})
    full = oai.completions.create(**kw).choices[0].text
    chunks = list(oai.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full
    assert chunks[-1].usage.completion_tokens == 12


def test_seed_reproducible_and_n(oai):
    kw = dict(model=MODEL, prompt="class A:", max_tokens=10, temperature=1.0, extra_body={"ignore_eos": True})
    a = oai.completions.create(seed=123, **kw).choices[0].text
    b = oai.completions.create(seed=123, **kw).choices[0].text
    assert a == b
    others = {oai.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds never changed the output"
    r = oai.completions.create(seed=5, n=3, **kw)
    assert sorted(c.index for c in r.choices) == [0, 1, 2] and r.usage.completion_tokens == 30


def test_stop_string_cuts_output(oai):
    kw = dict(model=MODEL, prompt="x = ", max_tokens=16, seed=11, temperature=1.0, extra_body={"ignore_eos": True})
    text = oai.completions.create(**kw).choices[0].text
    assert len(text) >= 6, text
    stop = text[3:6]
    cut = oai.completions.create(stop=[stop], **kw).choices[0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.index(stop)]
    # streamed: text that could start the stop string is held back, so no part of it ever reaches the client
    chunks = list(oai.completions.create(stop=[stop], stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == cut.text


def test_logprobs(oai):
    r = oai.completions.create(model=MODEL, prompt="a", max_tokens=4, logprobs=3, seed=0,
                               extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(v is not None and v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    c = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}], max_tokens=3,
                                    logprobs=True, top_logprobs=2, seed=0)
    assert all(t.logprob <= 0 and len(t.top_logprobs) <= 2 for t in c.choices[0].logprobs.content)


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"], "additionalProperties": False}}}
NEWS = {"type": "function", "function": {"name": "get_news", "parameters": {
    "type": "object", "properties": {"top": {"type": "integer", "minimum": 1, "maximum": 5}}, "required": ["top"],
    "additionalProperties": False}}}


def test_tool_calls_required_and_named(oai):
    """tool_choice 'required' / a named function: the answer is a tool call whose arguments fit the tool's schema
    (the output is constrained to it), whole in one stream delta too; 'auto' is a 400 that says what to send."""
    msgs = [{"role": "user", "content": "weather in Paris?"}]
    r = oai.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER, NEWS], tool_choice="required",
                                    max_tokens=120, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    args = json.loads(call.function.arguments)
    assert (call.function.name, set(args)) in (("get_weather", {"unit"}), ("get_news", {"top"})) and call.id
    named = {"type": "function", "function": {"name": "get_news"}}
    r = oai.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER, NEWS], tool_choice=named,
                                    max_tokens=120, temperature=0.9, seed=1)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_news" and json.loads(call.function.arguments)["top"] in range(1, 6)
    stream = oai.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], tool_choice="required",
                                         max_tokens=120, stream=True)
    calls = [tc for ch in stream for c in ch.choices for tc in (c.delta.tool_calls or [])]
    assert len(calls) == 1 and json.loads(calls[0].function.arguments)["unit"] in ("c", "f")
    with pytest.raises(openai.BadRequestError, match="--tool-call-parser"):
        oai.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=8)
    follow_up = [*msgs, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": "3 headlines"}]
    assert oai.chat.completions.create(model=MODEL, messages=follow_up, max_tokens=4).choices[0].message.content


def test_errors_have_openai_shape_and_status(server, oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="gpt-4", prompt="a")
    assert e.value.status_code == 400 and e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt="word " * 400, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt="a", temperature=-1)
    assert e.value.body["param"] == "temperature"
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and set(e.value.body) == {"message", "type", "param", "code"}


def test_image_to_text_only_model_is_a_400(oai):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}])
    assert e.value.status_code == 400 and e.value.code == "image_input_not_supported"
    assert "text-only" in e.value.body["message"] and e.value.body["param"] == "messages"


def test_client_disconnect_frees_kv_blocks(server):
    aborted_before = metric(server, "onecard_requests_aborted_total", default=0.0)
    body = {"model": MODEL, "prompt": "a", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        assert metric(server, "onecard_kv_cache_blocks_used") > 0
    deadline = time.monotonic() + 20
    while metric(server, "onecard_kv_cache_blocks_used") > 0 or metric(server, "onecard_num_requests_running") > 0:
        assert time.monotonic() < deadline, "KV blocks still held 20 s after the client disconnected"
        time.sleep(0.1)
    assert metric(server, "onecard_requests_aborted_total") == aborted_before + 1


def test_sigterm_mid_stream_exits_0(server_proc):
    """Last test of the module: it stops the shared server."""
    proc, url = server_proc
    body = {"model": MODEL, "prompt": "a", "max_tokens": 240, "stream": True, "ignore_eos": True}
    events = []
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=30) as r:
            lines = r.iter_lines()
            events.append(next(lines))
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.TransportError):  # no new connections once shutting down
                httpx.get(url + "/health", timeout=2)
            for line in lines:  # the in-flight stream ends (finished, or aborted at the timeout); it does not hang
                events.append(line)
                assert time.monotonic() - t0 < 30
    except httpx.RemoteProtocolError:
        pass  # the server closed the connection while aborting the request: also an end
    rc = proc.wait(30)
    elapsed = time.monotonic() - t0
    assert rc == 0
    assert elapsed < 20, f"shutdown took {elapsed:.1f} s with --shutdown-timeout 3"
    data = [e for e in events if e.startswith("data: ")]
    if data[-1] == "data: [DONE]":  # finished inside the grace period: whole, or an explicit abort error event
        last = json.loads(data[-2][6:])
        assert "error" in last or last["choices"][0]["finish_reason"] == "length"
