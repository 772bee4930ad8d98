"""Incremental detokenization and stop-string checks.

Decoding the whole output every step is quadratic; instead each step decodes a
short window (a few tokens before the new ones, for context) and keeps the
new suffix. A window ending in an incomplete UTF-8 sequence (U+FFFD) waits for
the next token. Stop strings are searched in the text that could contain a
new match (the new text plus ``len(stop) - 1`` characters before it), so a stop
string split across tokens is still found.
"""

from __future__ import annotations

from collections.abc import Callable

from onecard.engine.sequence import Sequence


def fast_decode(tokenizer) -> Callable[..., str]:
    """``tokenizer.decode``, or the same text from a fast tokenizer's Rust ``decode`` called directly: a streaming
    server decodes twice per token per step, and transformers' per-call Python around it costs ~3x the decode.
    Identical unless the tokenizer cleans up spaces after decoding (then the transformers call is kept)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return tokenizer.decode
    return backend.decode


def append_text(tokenizer, seq: Sequence) -> str:
    """Decode the tokens added since the last call; append them to ``seq.text`` and return the new text."""
    skip = seq.params.skip_special_tokens
    decode = fast_decode(tokenizer)
    prefix = decode(seq.token_ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip)
    full = decode(seq.token_ids[seq.prefix_offset:], skip_special_tokens=skip)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        new = full[len(prefix):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.token_ids)
        seq.text += new
        return new
    return ""


def find_stop(seq: Sequence, new_text_len: int) -> int:
    """Index in ``seq.text`` where the earliest new stop-string match starts, or -1."""
    stops = seq.params.stop
    if not stops or new_text_len == 0:
        return -1
    longest = max(len(s) for s in stops)
    start = max(0, len(seq.text) - new_text_len - longest + 1)
    hits = [i for i in (seq.text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1
