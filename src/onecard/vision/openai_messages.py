"""OpenAI-style chat messages with ``image_url`` content parts -> (image, question) for ``VisionModel``.

The shape ``/v1/chat/completions`` clients send:
``{"role": "user", "content": [{"type": "text", "text": "..."}, {"type": "image_url",
"image_url": {"url": "data:image/png;base64,..."}}]}``. Only ``data:`` URLs are
accepted (onecard never downloads); one image per request (llava-1.5 was
trained on one).
"""

from __future__ import annotations

from onecard.errors import BadInputError, NotBuiltYetError
from onecard.vision.images import decode_data_url


def image_question(messages: list[dict]) -> tuple[bytes, str]:
    """The image bytes and the question text of the last user message; one-line errors for anything else."""
    if not isinstance(messages, list) or not messages:
        raise BadInputError("messages must be a non-empty list of {'role', 'content'} objects")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise BadInputError("no user message; send {'role': 'user', 'content': [text and image_url parts]}")
    if len(users) > 1 or any(m.get("role") == "assistant" for m in messages if isinstance(m, dict)):
        raise NotBuiltYetError("multi-turn image chat is not implemented; send one user message with the image "
                               "and the question")
    content = users[-1].get("content")
    if isinstance(content, str):
        raise BadInputError("the user message has no image; add an {'type': 'image_url', 'image_url': {'url': "
                            "'data:image/png;base64,...'}} content part")
    if not isinstance(content, list):
        raise BadInputError("message content must be a string or a list of content parts")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise BadInputError("image_url part needs {'url': 'data:image/...;base64,...'}")
            if not url.startswith("data:"):
                raise BadInputError(f"image_url '{url[:60]}' is not a data: URL and onecard never downloads; "
                                    "send the image inline as data:image/png;base64,...")
            images.append(decode_data_url(url))
        else:
            raise BadInputError(f"unsupported content part type {kind!r}; use 'text' and 'image_url'")
    if len(images) != 1:
        raise BadInputError(f"the user message has {len(images)} images; send exactly one (llava-1.5 takes one)")
    question = " ".join(t.strip() for t in texts if t.strip())
    if not question:
        raise BadInputError("the user message has an image but no question; add a text part")
    return images[0], question
