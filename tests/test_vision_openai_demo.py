"""OpenAI image_url content parts -> (image, question), and the demo stage."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from onecard.errors import BadInputError, NotBuiltYetError
from onecard.vision.images import load_image
from onecard.vision.openai_messages import image_question


def data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), "red").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_image_question_from_openai_parts():
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What color is it?"},
                                         {"type": "image_url", "image_url": {"url": data_url()}}]}]
    data, question = image_question(msgs)
    assert question == "What color is it?"
    img = load_image(data)
    assert img.size == (32, 24) and img.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("content, error, match", [
    ("just text", BadInputError, "has no image"),
    ([{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}, {"type": "text", "text": "q"}],
     BadInputError, "never downloads"),
    ([{"type": "text", "text": "q"}], BadInputError, "has 0 images"),
    ([{"type": "image_url", "image_url": {"url": "DATA"}}], BadInputError, "no question"),
    ([{"type": "audio", "audio": {}}], BadInputError, "unsupported content part"),
])
def test_bad_openai_messages(content, error, match):
    content = [dict(p, image_url={"url": data_url()}) if p.get("image_url", {}).get("url") == "DATA" else p
               for p in content] if isinstance(content, list) else content
    with pytest.raises(error, match=match):
        image_question([{"role": "user", "content": content}])


def test_multi_turn_is_refused():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url()}}]}]
    with pytest.raises(NotBuiltYetError, match="multi-turn"):
        image_question(msgs)


def test_demo_stage(tmp_path):
    from rich.console import Console

    from onecard.demo import DemoContext
    from onecard.vision.demo_stage import demo_stage

    ctx = DemoContext(tmp_path, "cpu", Console(file=io.StringIO()))
    result = demo_stage(ctx)
    assert result.ok and "64 image" in result.summary and "engine backend" in result.summary
    assert ctx.artifacts["vision_tok_s"] > 0
