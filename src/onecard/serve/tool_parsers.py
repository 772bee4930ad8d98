"""Tool calls a model wrote in its own format (``tool_choice`` ``auto``), read back into OpenAI's ``tool_calls``.

With ``auto`` the model decides whether to call a tool, so its output is not
constrained, and each model family writes calls its own way; ``onecard serve
--tool-call-parser NAME`` says which (vLLM's names):

- ``hermes`` (Hermes, Qwen2/2.5 and most chat models trained on its format):
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call,
  text before the first block being the message's content;
- ``llama3_json`` (Llama 3.1-3.3): the whole answer is ``{"name": ..., "parameters": {...}}``
  (after an optional ``<|python_tag|>``), or several such objects joined by ``;``.

An answer that holds no well-formed call (bad JSON, a name that is not one of the
request's tools) is returned as plain content, never half-parsed.
"""

from __future__ import annotations

import json
import re

PARSERS = ("hermes", "llama3_json")
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(parser: str, text: str, tool_names: set[str]) -> tuple[str | None, list[tuple[str, dict]]]:
    """(content, [(name, arguments)]) of an answer; no calls means the whole text is content."""
    if parser == "hermes":
        blocks = _HERMES.findall(text)
        objects = [_loads(b) for b in blocks]
        content = (text[:text.find("<tool_call>")].strip() or None) if blocks else text
    elif parser == "llama3_json":
        objects = _json_objects(text.strip().removeprefix("<|python_tag|>").strip())
        content = None
    else:
        raise ValueError(f"unknown tool-call parser {parser!r}; choose one of {', '.join(PARSERS)}")
    calls = [_call(obj, tool_names) for obj in objects]
    if not calls or any(c is None for c in calls):
        return text, []
    return content, calls


def _loads(block: str) -> object:
    try:
        return json.loads(block)
    except json.JSONDecodeError:
        return None


def _json_objects(body: str) -> list[object]:
    """The JSON values of ``body`` written one after another, ``;`` between them; [None] if anything else is there."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(body):
        try:
            obj, i = decoder.raw_decode(body, i)
        except json.JSONDecodeError:
            return [None]
        out.append(obj)
        while i < len(body) and (body[i].isspace() or body[i] == ";"):
            i += 1
    return out


def _call(obj: object, tool_names: set[str]) -> tuple[str, dict] | None:
    if not isinstance(obj, dict) or obj.get("name") not in tool_names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return (obj["name"], args) if isinstance(args, dict) else None
