"""Reading tool calls back from what models write (tool_choice auto): each parser's format, several calls, and
answers that hold no well-formed call staying plain content."""

from __future__ import annotations

import pytest

from onecard.serve.tool_parsers import parse_tool_calls

TOOLS = {"get_weather", "get_news"}


def test_hermes():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris; FR"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_news", "arguments": {}}</tool_call>')
    assert parse_tool_calls("hermes", text, TOOLS) == (
        "Let me check.", [("get_weather", {"city": "Paris; FR"}), ("get_news", {})])
    assert parse_tool_calls("hermes", "<tool_call>{\"name\": \"get_news\"}</tool_call>", TOOLS) == (
        None, [("get_news", {})])
    for plain in ("It is sunny.", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
                  '<tool_call>{"name": "get_news", "arguments": {</tool_call>',
                  '<tool_call>{"name": "get_news", "arguments": [1]}</tool_call>'):
        assert parse_tool_calls("hermes", plain, TOOLS) == (plain, [])


def test_llama3_json():
    one = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "a; b"}}'
    assert parse_tool_calls("llama3_json", one, TOOLS) == (None, [("get_weather", {"city": "a; b"})])
    two = '{"name": "get_weather", "parameters": {}}; {"name": "get_news", "parameters": {"top": 3}}'
    assert parse_tool_calls("llama3_json", two, TOOLS) == (None, [("get_weather", {}), ("get_news", {"top": 3})])
    for plain in ("The weather is fine.", '{"name": "get_weather", "parameters": {}} and more text', "{}"):
        assert parse_tool_calls("llama3_json", plain, TOOLS) == (plain, [])


def test_unknown_parser():
    with pytest.raises(ValueError, match="hermes, llama3_json"):
        parse_tool_calls("mistral", "x", TOOLS)
