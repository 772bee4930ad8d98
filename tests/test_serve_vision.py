"""Image questions over HTTP: ``onecard serve LLAVA_DIR`` in a subprocess, the real ``openai`` client, a drawn PNG.

The server's answer must be exactly ``onecard.vision``'s offline greedy answer
for the same image and question (same folder, same float weights, same CPU):
the route, the streaming and the abort path are the text server's, the
generation is ``VisionModel``'s. A text-only chat to the same server must be
transformers' own greedy answer for the chat template's input ids.
"""

from __future__ import annotations

import base64
import io
import time

import pytest
from PIL import Image, ImageDraw

httpx = pytest.importorskip("httpx")  # the GPU machine lacks the serve extras: skip, don't error
openai = pytest.importorskip("openai")

from onecard.serve.launch import start_server
from onecard.vision import VisionModel
from onecard.vision.testing import make_llava_checkpoint

MODEL = "llava"
QUESTION = "What shapes are in the picture?"
MAX_TOKENS = 10


def shapes_png() -> bytes:
    img = Image.new("RGB", (200, 150), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([20, 20, 90, 80], fill="red")
    d.ellipse([100, 50, 190, 140], fill="blue")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_message(url: str, question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def llava_dir():
    return make_llava_checkpoint(image_size=112, init_std=0.2)


@pytest.fixture(scope="module")
def server(llava_dir):
    with start_server(llava_dir, ("--served-model-name", MODEL, "--max-model-len", "160", "--shutdown-timeout", "3"),
                      cpu=True) as srv:
        yield srv
    assert srv.returncode == 0, srv.log_tail()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(llava_dir):
    vm = VisionModel.from_pretrained(llava_dir, device="cpu", int4=False)
    png = shapes_png()
    return vm.generate(png, QUESTION, max_tokens=MAX_TOKENS), png


def test_answer_equals_offline_greedy(oai, offline):
    ans, png = offline
    assert ans.backend == "engine" and len(set(ans.token_ids)) > 3  # a varied answer: agreement means something
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    r = oai.chat.completions.create(model=MODEL, messages=image_message(url), max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].message.content.strip() == ans.text
    assert r.choices[0].finish_reason == ("stop" if ans.finish_reason == "stop" else "length")
    assert r.usage.completion_tokens == len(ans.token_ids) and r.usage.prompt_tokens == ans.num_prompt_tokens
    chunks = list(oai.chat.completions.create(model=MODEL, messages=image_message(url), max_tokens=MAX_TOKENS,
                                              temperature=0, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1 and "".join(deltas).strip() == ans.text
    assert chunks[-1].usage.completion_tokens == len(ans.token_ids)


@pytest.mark.parametrize("content, match", [
    ([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, {"type": "text", "text": "q"}],
     "never downloads"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}},
      {"type": "text", "text": "q"}], "not an image"),
])
def test_bad_image_requests_are_400(oai, content, match):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=4)
    assert e.value.status_code == 400 and match in e.value.body["message"] and e.value.body["param"] == "messages"


def test_unsupported_fields_and_completions_are_400(oai):
    url = "data:image/png;base64," + base64.b64encode(shapes_png()).decode()
    with pytest.raises(openai.BadRequestError, match="'n' is not supported by onecard serve on a LLaVA folder"):
        oai.chat.completions.create(model=MODEL, messages=image_message(url), max_tokens=4, n=2)
    with pytest.raises(openai.BadRequestError, match="send /v1/chat/completions requests"):
        oai.completions.create(model=MODEL, prompt="a", max_tokens=4)


CHAT = [{"role": "user", "content": "Name three colours."}, {"role": "assistant", "content": "Red, green, blue."},
        {"role": "user", "content": [{"type": "text", "text": "And three shapes?"}]}]


@pytest.fixture(scope="module")
def hf_text_answer(llava_dir):
    """transformers' own greedy answer to CHAT (no image): the processor's chat template, LlavaForConditionalGeneration
    ``generate`` on the input ids alone; (prompt token count, answer token ids, answer text)."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(str(llava_dir))
    conv = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str)
             else m["content"]} for m in CHAT]
    ids = proc.tokenizer(proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False), return_tensors="pt")
    hf = LlavaForConditionalGeneration.from_pretrained(str(llava_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
    answer = out[:-1] if out[-1] == proc.tokenizer.eos_token_id else out
    return ids["input_ids"].shape[1], out, proc.tokenizer.decode(answer, skip_special_tokens=True).strip()


def test_text_only_chat_equals_hf_greedy(oai, hf_text_answer):
    n_prompt, tokens, text = hf_text_answer
    assert len(set(tokens)) > 3  # a varied answer: agreement means something
    r = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].message.content.strip() == text
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == len(tokens)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1 and "".join(deltas).strip() == text
    assert chunks[-1].usage.completion_tokens == len(tokens)


def test_text_with_image_placeholder_is_400(oai):
    with pytest.raises(openai.BadRequestError, match="image placeholder") as e:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "<image> what is it?"}],
                                    max_tokens=4)
    assert e.value.body["param"] == "messages"


def test_models_report_the_vision_engine(oai, server):
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["options"]["backend"] == "engine" and card["options"]["max_num_seqs"] == 1
    assert card["max_model_len"] == 160 and card["options"]["max_model_len"] == 160
    assert 'onecard_engine_info{backend="engine"' in httpx.get(server.url + "/metrics").text


def metric(url: str, name: str) -> float:
    """Sum of a metric's samples over its labels (0 when it has none yet)."""
    return sum(float(line.split()[-1]) for line in httpx.get(url + "/metrics").text.splitlines()
               if line.startswith((name + " ", name + "{")))


def blocks_used(url: str) -> float:
    return metric(url, "onecard_kv_cache_blocks_used")


def test_disconnect_frees_kv_blocks(server):
    url = "data:image/png;base64," + base64.b64encode(shapes_png()).decode()
    aborted = metric(server.url, "onecard_requests_aborted_total")
    body = {"model": MODEL, "messages": image_message(url), "max_tokens": 60, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert blocks_used(server.url) > 0
    deadline = time.monotonic() + 30
    while blocks_used(server.url) > 0:
        assert time.monotonic() < deadline, "KV blocks still held 30 s after the client disconnected"
        time.sleep(0.1)
    assert metric(server.url, "onecard_requests_aborted_total") == aborted + 1  # stopped early, not finished
