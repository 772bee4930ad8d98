"""OpenAI's HTTP shapes as pydantic models: requests in, responses and stream chunks out.

Field names, defaults and ``object`` tags follow OpenAI's API reference so the
official clients (and anything written against them) work unchanged. A few
vLLM-style sampling extensions (``top_k``, ``min_p``, ``repetition_penalty``,
``ignore_eos``, ``stop_token_ids``, ``skip_special_tokens``) are accepted
because users of local servers expect them. Unknown fields are rejected with a
400 naming the field rather than silently ignored, and OpenAI fields that
onecard does not implement (suffix, best_of other than n, ...) are refused by name.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by completions and chat completions; they map one-to-one onto ``SamplingParams``."""

    model: str
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM-style extensions
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    guided_json: dict[str, Any] | str | None = None  # structured outputs (vLLM's names): a JSON Schema,
    guided_regex: str | None = None                  # a regex,
    guided_choice: list[str] | None = None           # or one of these strings
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's shape) -> bias

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops or None

    def structured_output(self) -> dict[str, Any]:
        """The request's structured output constraint as ``SamplingParams`` fields (SamplingParams checks that
        there is at most one)."""
        out: dict[str, Any] = {}
        if self.guided_json is not None:
            out["json_schema"] = self.guided_json
        if self.guided_regex is not None:
            out["regex"] = self.guided_regex
        if self.guided_choice is not None:
            out["choice"] = self.guided_choice
        return out

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and (len(v) == 0 or any(isinstance(p, list) and len(p) == 0 for p in v)):
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _refuse_unsupported_completion(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of different from n is not supported by onecard serve; drop best_of")
        if self.suffix:
            raise ValueError("suffix (fill-in-the-middle) is not supported by onecard serve; remove it")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (text or token ids), the batch form OpenAI accepts."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImageURLPart(_Strict):
    """An image as OpenAI's vision requests send it; onecard takes ``data:`` URLs only (it never downloads)."""

    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. "name", "tool_calls", "tool_call_id": passed to the template
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[Annotated[TextPart | ImageURLPart, Field(discriminator="type")]] | None = None

    def text(self) -> str:
        if self.content is None:  # an assistant turn that only called tools
            return ""
        return self.content if isinstance(self.content, str) else "".join(
            p.text for p in self.content if isinstance(p, TextPart))

    def has_image(self) -> bool:
        return isinstance(self.content, list) and any(isinstance(p, ImageURLPart) for p in self.content)


class FunctionSpec(BaseModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema; None: no arguments constraint beyond an object


class ToolSpec(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _refuse_unsupported_chat(self):
        choice = self.tool_choice
        if choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            if choice.get("type") != "function" or name not in {t.function.name for t in self.tools}:
                raise ValueError(f"tool_choice names no tool of this request: {choice}")
        kind = self.response_kind
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"response_format type {kind!r}: use text, json_object or json_schema")
        if kind == "json_schema" and not isinstance((self.response_format.get("json_schema") or {}).get("schema"), dict):
            raise ValueError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def has_images(self) -> bool:
        return any(m.has_image() for m in self.messages)

    @property
    def response_kind(self) -> str:
        """``response_format``'s type (text when absent)."""
        return (self.response_format or {}).get("type", "text")

    def parses_tool_calls(self) -> bool:
        """tool_choice 'auto' (the default with tools): the model decides, a parser reads its calls back."""
        return bool(self.tools) and self.tool_choice in (None, "auto")

    def called_tools(self) -> list[ToolSpec]:
        """The tools the answer must call one of (tool_choice 'required' or a named function); [] otherwise."""
        if not self.tools or self.tool_choice in (None, "none", "auto"):
            return []
        if self.tool_choice == "required":
            return list(self.tools)
        return [t for t in self.tools if t.function.name == self.tool_choice["function"]["name"]]

    def structured_output(self) -> dict[str, Any]:
        """``response_format`` (json_object, json_schema) besides the guided_* fields; a tool call is a JSON
        object ``{"name": ..., "arguments": {...}}`` constrained to the called tools' schemas."""
        out = super().structured_output()
        tools = self.called_tools()
        if tools:
            if out or self.response_kind != "text":
                raise ValueError("a tool call (tool_choice) cannot be combined with response_format or guided_*")
            calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                       "arguments": t.function.parameters or {"type": "object"}},
                      "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
            return {"json_schema": calls[0] if len(calls) == 1 else {"anyOf": calls}}
        if self.response_kind == "json_object":
            out["json_object"] = True
        elif self.response_kind == "json_schema":
            if "json_schema" in out:
                raise ValueError("give response_format json_schema or guided_json, not both")
            out["json_schema"] = self.response_format["json_schema"]["schema"]
        return out

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses --------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions logprobs object: parallel lists, one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # {"index", "id", "type", "function": {"name", "arguments"}}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "onecard"
    max_model_len: int | None = None
    options: dict | None = None  # the engine's active options (engine_info.py); None while it loads


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
