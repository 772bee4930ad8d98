"""Answer a question from the index: retrieve, build a prompt of numbered passages, generate, parse [n] citations.

When retrieval finds nothing similar enough (best cosine similarity below
``min_similarity``) the answer is "I don't know" and no model is called: a
small model given unrelated passages invents an answer, so we refuse first.

Generation goes through ``generate_text``; it uses HF transformers
``generate`` until ``onecard.engine.LLM`` exists (switching is that one
function). Callers that already hold a model (the server) pass ``generate=``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

from onecard.errors import BadInputError
from onecard.rag.splitter import Chunk
from onecard.rag.store import Hit, search

DEFAULT_MIN_SIMILARITY = 0.30  # all-MiniLM-L6-v2 cosine; calibrated on the stdlib eval set (docs/rag.md)
UNKNOWN = "I don't know"

PROMPT = """Answer the question using only the numbered context passages below. After each fact, cite the passage it comes from as [n]. If the passages do not contain the answer, reply exactly "I don't know".

{context}

Question: {question}
Answer:"""


@dataclass(frozen=True)
class Citation:
    n: int                 # the [n] used in the prompt and the answer
    source: str
    page: int | None
    heading: str
    score: float           # retrieval score of the chunk (RRF for hybrid)
    similarity: float | None = None


@dataclass
class Answer:
    text: str
    citations: list[Citation]            # the passages the answer actually cites, in order of first citation
    chunks: list[Chunk]                   # the numbered context: chunks[n - 1] is passage [n]
    context: list[Citation] = field(default_factory=list)  # every retrieved passage, cited or not
    unknown: bool = False
    invalid_citations: int = 0           # [n] in the answer with no passage n
    best_similarity: float | None = None
    prompt: str = ""


def format_context(hits: list[Hit]) -> str:
    parts = []
    for n, h in enumerate(hits, start=1):
        c = h.chunk
        where = Path(c.source).name + (f", page {c.page}" if c.page else "") + (f", section: {c.heading}" if c.heading else "")
        parts.append(f"[{n}] ({where})\n{c.text}")
    return "\n\n".join(parts)


def build_prompt(question: str, hits: list[Hit]) -> str:
    return PROMPT.format(context=format_context(hits), question=question.strip())


_CITE = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


def parse_citations(text: str, n_passages: int) -> tuple[list[int], int]:
    """Distinct valid passage numbers cited as [n] or [n, m], in order; and the count of invalid ones."""
    valid, invalid = [], 0
    for m in _CITE.finditer(text):
        for tok in m.group(1).split(","):
            n = int(tok)
            if 1 <= n <= n_passages:
                if n not in valid:
                    valid.append(n)
            else:
                invalid += 1
    return valid, invalid


@lru_cache(maxsize=2)
def _hf_model(model_dir: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onecard.models import open_model_folder

    open_model_folder(model_dir)  # validates the folder with a one-line error before transformers sees it
    tok = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return tok, model


def generate_text(model_dir: str | Path, prompt: str, max_tokens: int = 256, device: str | None = None) -> str:
    """Greedy completion of ``prompt`` (chat template when the tokenizer has one), repetition penalty 1.1.

    Until ``onecard.engine.LLM`` lands this is HF ``generate``; then it becomes
    ``LLM(model_dir).generate([prompt], SamplingParams(temperature=0, max_tokens=..., repetition_penalty=1.1))``.
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok, model = _hf_model(str(model_dir), device)
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and ids.shape[1] + max_tokens > limit:
        raise BadInputError(f"prompt of {ids.shape[1]} tokens + {max_tokens} new exceeds the model's context of "
                            f"{limit}; use a smaller --k or a model with a longer context")
    ids = ids.to(device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             repetition_penalty=1.1, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def ask(question: str, db: str | Path, model: str | Path | None = None, k: int = 5, mode: str = "hybrid",
        min_similarity: float = DEFAULT_MIN_SIMILARITY, max_tokens: int = 256,
        generate: Callable[[str], str] | None = None, embedder: str | None = None) -> Answer:
    """Answer ``question`` from the index at ``db`` with citations; "I don't know" when nothing relevant is found.

    Pass ``model`` (a local HF model folder) or ``generate`` (prompt -> text) to write the answer.
    """
    if generate is None and model is None:
        raise BadInputError("answering needs a model: pass --model DIR (a local HF model folder); "
                            "'onecard rag search' gives retrieval without one")
    result = search(question, db, k=k, mode=mode, embedder=embedder)
    hits = result.hits
    best = max((h.similarity for h in hits if h.similarity is not None), default=None)
    context = [Citation(n, h.chunk.source, h.chunk.page, h.chunk.heading, h.score, h.similarity)
               for n, h in enumerate(hits, start=1)]
    if not hits or best is None or best < min_similarity:
        why = "the index is empty" if not hits else f"best similarity {best:.2f} < {min_similarity:.2f}"
        return Answer(f"{UNKNOWN}: nothing in the index is relevant enough ({why}).", [], [h.chunk for h in hits],
                      context, unknown=True, best_similarity=best)
    prompt = build_prompt(question, hits)
    text = generate(prompt) if generate is not None else generate_text(model, prompt, max_tokens=max_tokens)
    cited, invalid = parse_citations(text, len(hits))
    return Answer(text, [context[n - 1] for n in cited], [h.chunk for h in hits], context,
                  unknown=text.strip().lower().startswith(UNKNOWN.lower()), invalid_citations=invalid,
                  best_similarity=best, prompt=prompt)
