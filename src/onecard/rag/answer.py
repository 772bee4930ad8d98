"""Answer a question from the index: retrieve, build a prompt of numbered passages, generate, parse [n] citations.

When retrieval finds nothing similar enough (best cosine similarity below
``min_similarity``) the answer is "I don't know" and no model is called: a
small model given unrelated passages invents an answer, so we refuse first.

Generation goes through ``EngineWriter`` (``onecard.engine.LLM``, which
itself falls back to HF transformers for architectures it does not run);
passages that do not fit the model's context are dropped, lowest rank first.
Callers that already hold a model (the server) pass ``generate=``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from onecard.errors import BadInputError
from onecard.rag.splitter import Chunk
from onecard.rag.static_embedder import STATIC_EMBEDDER
from onecard.rag.store import Hit, search, shared_store

# all-MiniLM-L6-v2 cosine. On the stdlib eval index the best hit of every real question scored >= 0.41 and of
# every off-topic question (eval/offtopic_questions.txt) <= 0.31: 0.35 sits between (docs/rag.md).
DEFAULT_MIN_SIMILARITY = 0.35


def best_similarity(question: str, hits: list[Hit], embedder: str) -> float | None:
    """How close the best retrieved passage is to the question, as all-MiniLM-L6-v2's cosine (the threshold's scale).

    A MiniLM index has it already (``Hit.similarity``). The static embedder's cosines have no fixed scale: a
    mean of token vectors over a long chunk drifts toward a common direction, so on the stdlib index real and
    off-topic questions scored 0.57+ vs up to 0.53, while on short notes a real question scored 0.37. So for a
    static index the question and the top hits are embedded again with MiniLM (k + 1 texts, at answer time only).
    """
    if embedder == STATIC_EMBEDDER and hits:
        from onecard.rag.embeddings import DEFAULT_MODEL, load_embedder
        from onecard.rag.indexer import embed_text

        vecs = load_embedder(DEFAULT_MODEL).encode([question] + [embed_text(h.chunk) for h in hits])
        return float((vecs[1:] @ vecs[0]).max())
    return max((h.similarity for h in hits if h.similarity is not None), default=None)
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
    score: float           # retrieval score of the chunk (fused score for hybrid)
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


class EngineWriter:
    """Writes answers with onecard's engine (``LLM``): greedy, repetition penalty 1.1 as the seed article uses
    against loops; the chat template when the tokenizer has one. Knows the model's context to fit the prompt."""

    def __init__(self, model_dir: str | Path, device: str | None = None) -> None:
        from onecard.engine import LLM

        self.llm = LLM(str(model_dir), device=device)
        self.max_len = int(self.llm.config.max_model_len)
        self.chat = getattr(self.llm.tokenizer, "chat_template", None) is not None

    def count_tokens(self, prompt: str) -> int:
        if self.chat:
            ids = self.llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                         add_generation_prompt=True, tokenize=True)
            return len(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return len(self.llm.tokenizer(prompt)["input_ids"])

    def __call__(self, prompt: str, max_tokens: int = 256) -> str:
        from onecard.engine import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=max_tokens, repetition_penalty=1.1)
        if self.chat:
            out = self.llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)
        else:
            out = self.llm.generate([prompt], params, use_tqdm=False)
        return out[0].outputs[0].text.strip()


@lru_cache(maxsize=2)
def engine_writer(model_dir: str, device: str | None = None) -> EngineWriter:
    return EngineWriter(model_dir, device)


def fit_passages(question: str, hits: list[Hit], count_tokens: Callable[[str], int], budget: int) -> list[Hit]:
    """Drop the lowest-ranked passages (then shorten the last one) until the prompt fits ``budget`` tokens."""
    hits = list(hits)
    while len(hits) > 1 and count_tokens(build_prompt(question, hits)) > budget:
        hits.pop()
    while hits and count_tokens(build_prompt(question, hits)) > budget:
        h = hits[-1]
        text = h.chunk.text[: int(len(h.chunk.text) * 0.8)]
        if len(text) < 20:
            raise BadInputError(f"the question alone does not fit the model's context of {budget} tokens; shorten it")
        hits[-1] = replace(h, chunk=replace(h.chunk, text=text, end=h.chunk.start + len(text)))
    return hits


def ask(question: str, db: str | Path, model: str | Path | None = None, k: int = 5, mode: str = "hybrid",
        min_similarity: float = DEFAULT_MIN_SIMILARITY, max_tokens: int = 256,
        generate: Callable[[str], str] | None = None, embedder: str | None = None) -> Answer:
    """Answer ``question`` from the index at ``db`` with citations; "I don't know" when nothing relevant is found.

    Pass ``model`` (a local HF model folder) or ``generate`` (prompt -> text) to write the answer.
    ``min_similarity`` applies to ``best_similarity`` (all-MiniLM-L6-v2's cosine, whatever built the index).
    """
    if generate is None and model is None:
        raise BadInputError("answering needs a model: pass --model DIR (a local HF model folder); "
                            "'onecard rag search' gives retrieval without one")
    result = search(question, db, k=k, mode=mode, embedder=embedder)
    hits = result.hits
    best = best_similarity(question, hits, shared_store(db).get_meta().get("embedder", ""))
    context = [Citation(n, h.chunk.source, h.chunk.page, h.chunk.heading, h.score, h.similarity)
               for n, h in enumerate(hits, start=1)]
    if not hits or best is None or best < min_similarity:
        why = "the index is empty" if not hits else f"best similarity {best:.2f} < {min_similarity:.2f}"
        return Answer(f"{UNKNOWN}: nothing in the index is relevant enough ({why}).", [], [h.chunk for h in hits],
                      context, unknown=True, best_similarity=best)
    if generate is None:
        writer = engine_writer(str(model))
        hits = fit_passages(question, hits, writer.count_tokens, writer.max_len - max_tokens)
        context = context[: len(hits)]
        generate = lambda p: writer(p, max_tokens)
    prompt = build_prompt(question, hits)
    text = generate(prompt)
    cited, invalid = parse_citations(text, len(hits))
    return Answer(text, [context[n - 1] for n in cited], [h.chunk for h in hits], context,
                  unknown=text.strip().lower().startswith(UNKNOWN.lower()), invalid_citations=invalid,
                  best_similarity=best, prompt=prompt)
