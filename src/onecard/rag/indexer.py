"""Build or update an index from a folder: hash, load changed files, split, embed, write atomically.

Incremental: a file whose SHA-256 matches the index is not read again; files
that disappeared from the folder (or are now excluded / unreadable) are
removed. All embedding happens before the write transaction, so a crash at
any point leaves the previous index as it was.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from onecard.errors import BadInputError
from onecard.rag.loaders import SkipFile, find_files, load_file
from onecard.rag.splitter import SplitConfig, split_documents
from onecard.rag.store import FileUpdate, check_embedder, open_store

log = logging.getLogger(__name__)


@dataclass
class IndexReport:
    db: str
    files_seen: int = 0
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    chunks_written: int = 0
    total_chunks: int = 0
    embed_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def chunks_per_s(self) -> float:
        """Embedding throughput of this run (chunks / seconds spent in the embedder)."""
        return self.chunks_written / self.embed_seconds if self.embed_seconds > 0 else 0.0


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def embed_text(chunk) -> str:
    """What the embedder sees: the chunk behind a short header (file and heading), so a chunk deep in a
    section still carries the words that say what it is about. The stored/displayed text is the chunk alone."""
    name = "/".join(Path(chunk.source).parts[-2:])
    head = f"{name} | {chunk.heading}" if chunk.heading else name
    return f"{head}\n{chunk.text}"


def index_directory(directory: str | Path, db: str | Path, include: list[str] | None = None,
                    exclude: list[str] | None = None, split: SplitConfig | None = None, embedder: str | None = None,
                    batch_size: int = 64, progress: bool = False) -> IndexReport:
    """Index (or update the index of) every supported file under ``directory`` into ``db``.

    ``embedder``: ``minilm``, ``static`` or a local folder; None = the index's own, or for a new index
    ``default_embedder()`` (static on a CPU, MiniLM on a GPU). Another embedder than the index's is refused."""
    from onecard.rag.embeddings import embedder_name, load_embedder

    t_start = time.perf_counter()
    root = Path(directory).expanduser()
    if root.is_dir() and not any(root.iterdir()):
        raise BadInputError(f"'{root}' is empty; put documents (PDF, Markdown, HTML, text, code) in it first")
    paths = find_files(root, include, exclude)  # raises BadInputError if missing
    if not paths:
        raise BadInputError(f"no files under '{root}' match the include/exclude globs")
    split = split or SplitConfig()
    store = open_store(db, create=True)
    report = IndexReport(db=str(db), files_seen=len(paths))
    try:
        meta = store.get_meta()
        check_embedder(meta, embedder_name(embedder or meta.get("embedder")))  # before minutes of loading
        emb = load_embedder(embedder or meta.get("embedder"))
        want = {"chunk_size": str(split.chunk_size), "chunk_overlap": str(split.chunk_overlap), "unit": split.unit}
        for key, value in want.items():
            if key in meta and meta[key] != value:
                raise BadInputError(f"this index was built with {key}={meta[key]}, not {value}; "
                                    "use the same splitter settings or build a new --db")
        known = store.file_hashes()
        base = root.resolve() if root.is_dir() else root.resolve().parent
        seen: set[str] = set()
        todo: list[tuple[str, str, list]] = []  # (path, sha, documents)
        for path in paths:
            key = path.as_posix()
            try:
                sha = file_sha256(path)
            except OSError as err:
                report.skipped.append((key, f"unreadable: {err.strerror or err}"))
                continue
            if known.get(key) == sha:
                seen.add(key)
                report.unchanged += 1
                continue
            try:
                docs = load_file(path)
            except SkipFile as why:
                report.skipped.append((key, str(why)))
                continue
            seen.add(key)
            (report.changed if key in known else report.added).append(key)
            todo.append((key, sha, docs))
        # files of this folder that the index holds but the walk no longer yields
        under = base.as_posix().rstrip("/") + "/"
        report.removed = sorted(p for p in known if p.startswith(under) and p not in seen) if root.is_dir() else []

        token_length = emb.token_length if split.unit == "tokens" else None
        per_file = [(key, sha, split_documents(docs, split, token_length)) for key, sha, docs in todo]
        all_chunks = [c for _, _, cs in per_file for c in cs]
        t0 = time.perf_counter()
        vectors = emb.encode([embed_text(c) for c in all_chunks], batch_size=batch_size, progress=progress)
        report.embed_seconds = time.perf_counter() - t0
        updates, pos = [], 0
        for key, sha, cs in per_file:
            updates.append(FileUpdate(key, sha, cs, vectors[pos:pos + len(cs)]))
            pos += len(cs)
        if updates or report.removed or not meta:
            store.apply(updates, report.removed, {"embedder": emb.name, "dim": str(emb.dim), **want})
        report.chunks_written = len(all_chunks)
        report.total_chunks = store.count()
    finally:
        store.close()
    report.seconds = time.perf_counter() - t_start
    for path, why in report.skipped:
        log.warning("skipped %s: %s", path, why)
    return report
