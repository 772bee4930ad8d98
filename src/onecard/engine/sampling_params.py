"""``SamplingParams``: how one request is decoded (vLLM's names and defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from onecard.errors import BadInputError


@dataclass
class SamplingParams:
    """Per-request decoding settings; validated at construction (``BadInputError``, a ValueError, names the field).

    temperature=0 means greedy. top_k=0 (or -1) disables top-k. ``stop`` strings
    end generation when they appear in the text (the text is cut before them);
    ``stop_token_ids`` and the model's EOS (unless ``ignore_eos``) end it on a token.
    ``logprobs=k`` returns the top-k log-probabilities (plus the sampled token's)
    of the model's distribution at every generated position; ``prompt_logprobs=k``
    the same for every prompt token after the first (scoring a text: its prompt
    is computed in full, not taken from the prefix cache).

    Structured outputs (at most one; ``structured.py``, needs xgrammar): ``json_object=True`` (any JSON
    object), ``json_schema`` (a JSON Schema, as a dict or a JSON string), ``regex``, or ``choice`` (exactly one
    of these strings). Only tokens that keep the output inside the grammar can be sampled, and the request
    stops when the grammar is complete.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0  # vLLM's: no end-of-sequence, stop token or stop string before this many tokens
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # vLLM's: top-k logprobs of every prompt token after the first
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # OpenAI's: token id -> bias in [-100, 100] added to its logit
    json_object: bool = False
    json_schema: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> BadInputError:
            return BadInputError(f"SamplingParams.{field}={getattr(self, field)!r}: {why}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be >= 0 (0 = greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "must be an integer >= 0 (0 or -1 = off)")
        if self.top_k == -1:
            self.top_k = 0
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 = off)")
        for f in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, f)) or not -2 <= getattr(self, f) <= 2:
                raise bad(f, "must be in [-2, 2] (0 = off)")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "must be an integer or None")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens <= 0):
            raise bad("max_tokens", "must be a positive integer (or None: up to max_model_len)")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0 or (
                self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise bad("min_tokens", "must be an integer in [0, max_tokens]")
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            self.stop = list(self.stop)
        else:
            raise bad("stop", "must be a string or a list of strings")
        if any(s == "" for s in self.stop):
            raise bad("stop", "stop strings must not be empty")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of non-negative token ids")
        else:
            self.stop_token_ids = list(self.stop_token_ids)
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0 or self.logprobs > 20):
            raise bad("logprobs", "must be an integer in [0, 20] or None")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            raise bad("prompt_logprobs", "must be an integer in [0, 20] or None")
        if self.logit_bias is not None and (not isinstance(self.logit_bias, dict) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 and _is_number(b) and -100 <= b <= 100
                for t, b in self.logit_bias.items())):
            raise bad("logit_bias", "must map token ids (integers >= 0) to biases in [-100, 100]")
        self._check_structured(bad)

    def _check_structured(self, bad) -> None:
        if not isinstance(self.json_object, bool):
            raise bad("json_object", "must be True or False")
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, str)):
            raise bad("json_schema", "must be a JSON Schema: a dict or a JSON string")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise bad("regex", "must be a non-empty string")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise bad("choice", "must be a non-empty list of non-empty strings")
        given = [f for f in ("json_object", "json_schema", "regex", "choice") if getattr(self, f) not in (None, False)]
        if len(given) > 1:
            raise bad(given[1], f"give one structured output constraint, not {' and '.join(given)}")
        if given and self.min_tokens:
            raise bad("min_tokens", f"cannot be combined with {given[0]}: the grammar decides where the output ends")

    @property
    def structured(self) -> tuple[str, object] | None:
        """(kind, value) of the structured output constraint, or None."""
        for kind in ("json_schema", "regex", "choice"):
            if getattr(self, kind) is not None:
                return kind, getattr(self, kind)
        return ("json_object", True) if self.json_object else None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)
