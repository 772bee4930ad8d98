"""Calibration batches: ``nsamples`` windows of ``seqlen`` tokens from local text, seeded.

GPTQ and AWQ only need activations that look like real use; the built-in
source is the local corpus (Python's own stdlib), so nothing is downloaded.
Windows are drawn at random start positions of the concatenated token stream
(as IST-DASLab/gptq does with C4/WikiText), so the same seed gives the same batch.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from onecard.errors import BadInputError

log = logging.getLogger(__name__)
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".html")


def read_texts(source: Path) -> list[str]:
    """Documents from a text file or a folder of text files (recursively)."""
    p = Path(source).expanduser()
    if not p.exists():
        raise BadInputError(f"calibration file '{p}' does not exist; pass a text file or a folder of .txt/.md files")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise BadInputError(f"no text files ({', '.join(TEXT_SUFFIXES)}) in '{p}'; pass a folder with text in it")
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise BadInputError(f"'{f}' is not UTF-8 text; pass plain text files for calibration") from None
    return [t for t in texts if t.strip()]


def calibration_tokens(tokenizer, nsamples: int, seqlen: int, seed: int = 0, source: Path | None = None) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids; raises ``BadInputError`` if the text has fewer than ``seqlen + 1`` tokens."""
    if source is None:
        from onecard.testing import local_corpus

        docs, where = list(local_corpus().train), "the built-in corpus"
    else:
        docs, where = read_texts(source), f"'{source}'"
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    want = max(2 * nsamples * seqlen, seqlen + 1)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for i in order:  # tokenize only as much text as the windows can use
        ids.extend(tokenizer.encode(docs[i], add_special_tokens=False))
        if eos is not None:
            ids.append(eos)
        if len(ids) >= want:
            break
    if len(ids) < seqlen + 1:
        raise BadInputError(f"calibration text in {where} is too short: {len(ids)} tokens, need at least "
                            f"{seqlen + 1} for --seqlen {seqlen}; give more text or lower --seqlen")
    if len(ids) < nsamples * seqlen:
        log.warning("calibration text has %d tokens < %d x %d: windows will overlap", len(ids), nsamples, seqlen)
    stream = torch.tensor(ids, dtype=torch.long)
    starts = [rng.randrange(0, len(ids) - seqlen) for _ in range(nsamples)]
    return torch.stack([stream[s:s + seqlen] for s in starts])
