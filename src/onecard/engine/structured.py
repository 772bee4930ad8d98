"""Structured outputs: JSON (any object, or matching a schema), a regex, or one of given strings, token by token.

The grammar work is xgrammar's (the engine vLLM and SGLang use; optional extra
``onecard[structured]``): it compiles a request's constraint against the
tokenizer's vocabulary once (cached per distinct constraint), and each sequence
gets its own ``GrammarMatcher`` that says, before every sampled token, which
tokens keep the output inside the grammar. Those become a bitmask applied to
the logits (after penalties, before temperature and the draw; logprobs stay the
model's raw distribution, as for every request). When the grammar is complete
the matcher allows only the end-of-sequence token, and the request stops there.
JSON comes compact (at most one space where JSON allows whitespace: xgrammar's
``any_whitespace=False``): runs of whitespace are an endless loop a small model
can fall into while staying valid.

The mask needs the previous token on the host, so a decode batch holding a
constrained request runs without async scheduling and without speculative
drafts (the rest of the engine is unchanged).
"""

from __future__ import annotations

import json
import re

import torch

from onecard.engine.sampling_params import SamplingParams
from onecard.engine.sequence import Sequence
from onecard.errors import BadInputError

JSON_OBJECT = {"type": "object"}


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise BadInputError("structured outputs (json_object, json_schema, regex, choice) need xgrammar: "
                            "pip install 'onecard[structured]'") from None
    return xgrammar


class Grammars:
    """One engine's grammar compiler (built on the first constrained request: the vocabulary scan takes a moment)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int]) -> None:
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, eos_token_ids
        self._compiler = None

    def compile(self, params: SamplingParams):
        """The compiled grammar of ``params``' constraint; a constraint xgrammar rejects is a ``BadInputError``."""
        xgr = _xgrammar()
        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=sorted(self.eos_token_ids))
            self._compiler = xgr.GrammarCompiler(info)
        kind, value = params.structured
        try:
            if kind in ("json_object", "json_schema"):  # json_object: OpenAI's "any JSON object"
                schema = JSON_OBJECT if kind == "json_object" else value
                return self._compiler.compile_json_schema(schema if isinstance(schema, str) else json.dumps(schema),
                                                          any_whitespace=False)
            if kind == "regex":
                return self._compiler.compile_regex(value)
            return self._compiler.compile_regex("|".join(re.escape(c) for c in value))
        except (RuntimeError, ValueError) as e:  # xgrammar's errors for a bad schema or regex
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadInputError(f"SamplingParams.{kind}: xgrammar cannot compile it ({first}); fix the "
                                f"{kind.replace('_', ' ')}") from None


def matcher(compiled):
    """A fresh matcher of a compiled grammar (one per sequence: each walks the grammar with its own tokens)."""
    return _xgrammar().GrammarMatcher(compiled)


def mask_logits_(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Set to -inf, in place, every token that would leave a constrained row's grammar (other rows untouched)."""
    rows = [i for i, s in enumerate(seqs) if s.matcher is not None]
    if not rows:
        return
    xgr = _xgrammar()
    bitmask = xgr.allocate_token_bitmask(len(seqs), logits.shape[1])
    for i in rows:
        seqs[i].matcher.fill_next_token_bitmask(bitmask, i)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)


def accept(seq: Sequence, token: int) -> bool:
    """Advance the sequence's matcher by its new token; True when the grammar is complete (the request ends)."""
    if not seq.matcher.accept_token(token):
        raise RuntimeError(f"token {token} was sampled outside the request's grammar; this is a bug, please report it")
    return seq.matcher.is_terminated()
