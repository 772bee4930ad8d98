"""Recursive, structure-aware splitting into overlapping chunks that remember where they came from.

A document is first cut into *sections* at its structure (Markdown/HTML
headings; top-level ``def``/``class`` in code). Each section is cut
recursively (paragraphs, lines, sentences, words, characters) into *atoms*
no longer than the chunk size; the atoms tile the section exactly, so
adjacent atoms merged greedily give chunks that cover every character, and
each new chunk starts early enough to repeat up to ``chunk_overlap`` of the
previous one. Invariant: ``chunk.text == document.text[chunk.start:chunk.end]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from onecard.errors import BadInputError
from onecard.rag.loaders import Document

_MD_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
_FENCE = re.compile(r"^(```|~~~)", re.M)
_CODE_DEF = re.compile(r"^([ \t]*)(?:async[ \t]+def|def|class|func|fn|function|struct|impl)[ \t]+([A-Za-z_][\w]*)", re.M)
# separators tried in order; a piece that is still too long is cut at the next one
_SEPARATORS = ("\n\n", "\n", ". ", "? ", "! ", "; ", ", ", " ", "")


@dataclass(frozen=True)
class SplitConfig:
    """Chunk size and overlap in characters (default 1000/200, as the seed) or in tokens of ``tokenizer``."""

    chunk_size: int = 1000
    chunk_overlap: int = 200
    unit: str = "chars"

    def __post_init__(self) -> None:
        if self.unit not in ("chars", "tokens"):
            raise BadInputError(f"unit must be 'chars' or 'tokens', not {self.unit!r}")
        if self.chunk_size < 16:
            raise BadInputError(f"chunk_size {self.chunk_size} is too small; use at least 16")
        if not 0 <= self.chunk_overlap < self.chunk_size:
            raise BadInputError(f"chunk_overlap must be in [0, chunk_size), got {self.chunk_overlap} for size {self.chunk_size}")


@dataclass(frozen=True)
class Chunk:
    source: str
    text: str
    start: int           # character offsets into the document (page text for PDFs)
    end: int
    heading: str = ""    # heading path, " > "-joined
    page: int | None = None
    kind: str = "text"


def _sections(doc: Document) -> list[tuple[int, int]]:
    """Hard boundaries: every Markdown/HTML heading (outside code fences); top-level defs in code."""
    text = doc.text
    cuts = [0]
    if doc.kind in ("markdown", "html"):
        fences = [m.start() for m in _FENCE.finditer(text)]
        for m in _MD_HEADING.finditer(text):
            if sum(1 for f in fences if f < m.start()) % 2 == 0:  # not inside a ``` block
                cuts.append(m.start())
    elif doc.kind == "code":
        cuts += [m.start() for m in _CODE_DEF.finditer(text) if not m.group(1)]
    cuts = sorted(set(cuts)) + [len(text)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def heading_index(doc: Document) -> list[tuple[int, int, str]]:
    """(offset, level, title) of every heading; code defs get their indentation depth as level."""
    out: list[tuple[int, int, str]] = []
    if doc.kind in ("markdown", "html"):
        fences = [m.start() for m in _FENCE.finditer(doc.text)]
        for m in _MD_HEADING.finditer(doc.text):
            if sum(1 for f in fences if f < m.start()) % 2 == 0:
                out.append((m.start(), len(m.group(1)), m.group(2).strip()))
    elif doc.kind == "code":
        for m in _CODE_DEF.finditer(doc.text):
            depth = len(m.group(1).expandtabs(4))
            word = m.group(0).split()[-2]  # 'def', 'class', ... ('async def' -> 'def')
            out.append((m.start(), depth, f"{word} {m.group(2)}"))
    return out


def heading_path_at(headings: list[tuple[int, int, str]], offset: int) -> str:
    """The chain of headings in force at ``offset`` (a deeper heading replaces those at its level and below)."""
    stack: list[tuple[int, str]] = []
    for pos, level, title in headings:
        if pos > offset:
            break
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title))
    return " > ".join(t for _, t in stack)


def _atoms(text: str, start: int, end: int, size: int, length: Callable[[str], int], seps: tuple[str, ...]) -> list[tuple[int, int]]:
    """Cut text[start:end] into contiguous spans each of length <= size, at the coarsest separator that works."""
    if length(text[start:end]) <= size:
        return [(start, end)]
    for i, sep in enumerate(seps):
        if sep == "":
            # no separator left: hard cut (chars; for tokens cut so each piece fits by bisection on length)
            out, a = [], start
            while a < end:
                b = min(end, a + size)
                while b > a + 1 and length(text[a:b]) > size:
                    b = a + max(1, (b - a) * 3 // 4)
                out.append((a, b))
                a = b
            return out
        if text.find(sep, start, end) == -1:
            continue
        pieces, a = [], start
        while True:
            j = text.find(sep, a, end)
            if j == -1:
                pieces.append((a, end))
                break
            pieces.append((a, j + len(sep)))  # separator stays with the piece before it
            a = j + len(sep)
            if a >= end:
                break
        out = []
        for a, b in pieces:
            if length(text[a:b]) <= size:
                out.append((a, b))
            else:
                out.extend(_atoms(text, a, b, size, length, seps[i + 1:]))
        return out
    return [(start, end)]


def _merge(atoms: list[tuple[int, int]], lens: list[int], size: int, overlap: int) -> list[tuple[int, int]]:
    """Greedy windows of consecutive atoms (sum of lengths <= size); each next window backs up <= overlap."""
    windows, i, n = [], 0, len(atoms)
    while i < n:
        j, total = i, lens[i]
        while j + 1 < n and total + lens[j + 1] <= size:
            j += 1
            total += lens[j]
        windows.append((atoms[i][0], atoms[j][1]))
        if j == n - 1:
            break
        # next window starts at the earliest atom k in (i, j+1] whose tail [k..j] fits in the overlap
        k, tail = j + 1, 0
        while k - 1 > i and tail + lens[k - 1] <= overlap:
            k -= 1
            tail += lens[k]
        i = k
    return windows


def split_document(doc: Document, config: SplitConfig | None = None,
                   token_length: Callable[[str], int] | None = None) -> list[Chunk]:
    """Chunks of one document; whitespace-only windows are dropped and edges trimmed (offsets stay exact)."""
    cfg = config or SplitConfig()
    if cfg.unit == "tokens":
        if token_length is None:
            raise BadInputError("unit='tokens' needs a token_length function (e.g. the embedder's tokenizer)")
        length = token_length
    else:
        length = len
    text = doc.text
    headings = heading_index(doc)
    chunks: list[Chunk] = []
    for s_start, s_end in _sections(doc):
        atoms = _atoms(text, s_start, s_end, cfg.chunk_size, length, _SEPARATORS)
        lens = [length(text[a:b]) for a, b in atoms]
        for a, b in _merge(atoms, lens, cfg.chunk_size, cfg.chunk_overlap):
            piece = text[a:b]
            stripped = piece.strip()
            if not stripped:
                continue
            a2 = a + (len(piece) - len(piece.lstrip()))
            b2 = a2 + len(stripped)
            if chunks and chunks[-1].start <= a2 and b2 <= chunks[-1].end:
                continue  # only whitespace beyond the previous chunk: nothing new to cover
            chunks.append(Chunk(doc.source, stripped, a2, b2, heading_path_at(headings, a2), doc.page, doc.kind))
    return chunks


def split_documents(docs: list[Document], config: SplitConfig | None = None,
                    token_length: Callable[[str], int] | None = None) -> list[Chunk]:
    return [c for d in docs for c in split_document(d, config, token_length)]
