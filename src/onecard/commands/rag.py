"""``onecard rag index|ask|search|eval``: local question answering with citations."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

DB_HELP = "Index file (SQLite) or postgresql:// URL."


def _short(path: str) -> str:
    """A source path relative to the working directory when it lies below it."""
    try:
        return os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
    except ValueError:
        return path


def register(app: typer.Typer) -> None:
    rag = typer.Typer(help="Local RAG: index documents, ask questions with citations.", no_args_is_help=True)

    @rag.command("index")
    def index_cmd(
        directory: str = typer.Argument(..., help="Folder (or file) of documents: PDF, Markdown, HTML, text, code."),
        db: str = typer.Option("kb.sqlite", "--db", help=DB_HELP),
        include: Optional[list[str]] = typer.Option(None, "--include", help="Glob of files to index (repeatable), e.g. '*.md'."),
        exclude: Optional[list[str]] = typer.Option(None, "--exclude", help="Glob of files to skip (repeatable); wins over --include."),
        chunk_size: int = typer.Option(1000, help="Chunk size (in --unit)."),
        chunk_overlap: int = typer.Option(200, help="Overlap between consecutive chunks (in --unit)."),
        unit: str = typer.Option("chars", help="chars | tokens (tokens of the embedder's tokenizer)."),
        embedder: Optional[str] = typer.Option(None, help="minilm | static | a local sentence-transformers or model2vec folder (default: minilm on GPU, static on CPU; an existing index keeps its own)."),
        batch_size: int = typer.Option(64, help="Embedding batch size."),
    ) -> None:
        """Index a folder of documents (incremental: only changed files are re-embedded)."""
        from rich.console import Console

        from onecard.rag.indexer import index_directory
        from onecard.rag.splitter import SplitConfig

        console = Console()
        rep = index_directory(directory, db, include=include, exclude=exclude,
                              split=SplitConfig(chunk_size, chunk_overlap, unit), embedder=embedder,
                              batch_size=batch_size, progress=True)
        for path, why in rep.skipped:
            console.print(f"[yellow]skipped[/] {_short(path)}: {why}", highlight=False)
        console.print(f"{rep.files_seen} files: {len(rep.added)} added, {len(rep.changed)} changed, "
                      f"{len(rep.removed)} removed, {rep.unchanged} unchanged, {len(rep.skipped)} skipped; "
                      f"{rep.chunks_written} chunks embedded ({rep.chunks_per_s:.0f} chunks/s), "
                      f"{rep.total_chunks} in {db} ({rep.seconds:.1f} s)", highlight=False)

    @rag.command("search")
    def search_cmd(
        query: str = typer.Argument(...),
        db: str = typer.Option("kb.sqlite", "--db", help=DB_HELP),
        k: int = typer.Option(5, "--k", help="Number of chunks."),
        mode: str = typer.Option("hybrid", "--mode", help="hybrid | vector | bm25"),
        fusion: str = typer.Option("minmax", "--fusion", help="How hybrid fuses the lists: minmax (scores) | rrf (ranks)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Retrieval only: the best chunks with their scores."""
        from rich.console import Console
        from rich.table import Table

        from onecard.rag.store import search

        res = search(query, db, k=k, mode=mode, fusion=fusion)
        if as_json:
            typer.echo(json.dumps({"mode": mode, "seconds": res.seconds, "hits": [
                {"rank": r, "score": h.score, "similarity": h.similarity, "bm25": h.bm25, "source": h.chunk.source,
                 "page": h.chunk.page, "heading": h.chunk.heading, "start": h.chunk.start, "end": h.chunk.end,
                 "text": h.chunk.text} for r, h in enumerate(res.hits, start=1)]}, indent=2))
            return
        table = Table("#", "score", "cos", "bm25", "source", "heading", "text", title=f"{mode} search ({res.seconds * 1e3:.1f} ms)")
        for r, h in enumerate(res.hits, start=1):
            src = _short(h.chunk.source) + (f" p.{h.chunk.page}" if h.chunk.page else "")
            table.add_row(str(r), f"{h.score:.4f}", "" if h.similarity is None else f"{h.similarity:.3f}",
                          "" if h.bm25 is None else f"{h.bm25:.2f}", src, h.chunk.heading,
                          " ".join(h.chunk.text.split())[:80])
        Console().print(table)

    @rag.command("ask")
    def ask_cmd(
        question: str = typer.Argument(...),
        db: str = typer.Option("kb.sqlite", "--db", help=DB_HELP),
        model: Optional[str] = typer.Option(None, "--model", help="Local HF model folder that writes the answer."),
        k: int = typer.Option(5, "--k", help="Number of context chunks."),
        min_similarity: Optional[float] = typer.Option(None, help="Below this best cosine similarity: \"I don't know\"."),
        max_tokens: int = typer.Option(256, help="Answer length limit in tokens."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Answer a question with numbered citations (file, page, heading)."""
        from dataclasses import asdict

        from rich.console import Console

        from onecard.rag.answer import DEFAULT_MIN_SIMILARITY, ask

        ans = ask(question, db, model=model, k=k, max_tokens=max_tokens,
                  min_similarity=DEFAULT_MIN_SIMILARITY if min_similarity is None else min_similarity)
        if as_json:
            typer.echo(json.dumps({"answer": ans.text, "unknown": ans.unknown, "best_similarity": ans.best_similarity,
                                   "citations": [asdict(c) for c in ans.citations],
                                   "context": [asdict(c) for c in ans.context]}, indent=2))
            return
        console = Console()
        console.print(ans.text, highlight=False)
        cited = {c.n for c in ans.citations}
        console.print("\n[bold]Sources[/] (retrieved; * = cited in the answer):")
        for c in ans.context:
            where = _short(c.source) + (f", page {c.page}" if c.page else "") + (f" > {c.heading}" if c.heading else "")
            sim = "" if c.similarity is None else f" cos {c.similarity:.2f}"
            console.print(f" {'*' if c.n in cited else ' '}[{c.n}] {where}{sim}", highlight=False)

    @rag.command("eval")
    def eval_cmd(
        db: str = typer.Option(..., "--db", help=DB_HELP),
        questions: Optional[str] = typer.Option(None, "--questions", help="JSONL questions (default: the packaged stdlib set)."),
        index_stdlib: bool = typer.Option(False, "--index-stdlib", help="First index the packaged set's stdlib corpus into --db."),
        embedder: Optional[str] = typer.Option(None, help="With --index-stdlib: minilm | static | a local folder (default as `rag index`)."),
        model: Optional[str] = typer.Option(None, "--model", help="Also answer each question with this model and score its citations."),
        limit: int = typer.Option(0, help="Answer only the first N questions with --model (0 = all)."),
        out: Optional[str] = typer.Option(None, "--out", help="Write the scores to this JSON file."),
    ) -> None:
        """recall@k and MRR for vector-only, BM25-only and hybrid retrieval; citation accuracy with --model."""
        import platform

        from rich.console import Console
        from rich.table import Table

        from onecard.bench.results import run_facts
        from onecard.rag.evalset import QUESTIONS_FILE, index_stdlib_corpus
        from onecard.rag.evaluate import (
            evaluate_citations,
            evaluate_retrieval,
            load_questions,
        )

        console = Console()
        indexed: dict = {}
        if index_stdlib:
            rep = index_stdlib_corpus(db, progress=True, embedder=embedder)
            indexed = {"index_chunks_per_s": rep.chunks_per_s, "index_embed_s": rep.embed_seconds}
            console.print(f"indexed stdlib corpus: {rep.total_chunks} chunks ({rep.chunks_written} embedded at "
                          f"{rep.chunks_per_s:.1f} chunks/s)")
        targets, missing = load_questions(questions or QUESTIONS_FILE)
        if missing:
            console.print(f"[yellow]{len(missing)} questions skipped: their passage is not in this Python's stdlib "
                          f"({', '.join(missing[:8])})", highlight=False)
        scores = evaluate_retrieval(db, targets, progress=True)
        table = Table("mode", "recall@1", "recall@5", "recall@10", "MRR", "p95 ms", title=f"{len(targets)} questions")
        from onecard.rag.store import open_store

        store = open_store(db)
        try:
            embedder_name = store.get_meta().get("embedder", "")
        finally:
            store.close()
        result: dict = {"embedder": embedder_name, "questions": len(targets), "questions_missing": len(missing), "cpu": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count(), "cpu_load_1min_at_start": os.getloadavg()[0], **indexed}
        for mode, s in scores.items():
            table.add_row(mode, *(f"{s.recall[k]:.3f}" for k in (1, 5, 10)), f"{s.mrr:.3f}", f"{s.p95_ms:.1f}")
            for k in (1, 5, 10):
                result[f"{mode}_recall_at_{k}"] = s.recall[k]
            result[f"{mode}_mrr"] = s.mrr
            result[f"{mode}_retrieval_p95_ms"] = s.p95_ms
        result["hybrid_minus_vector_recall_at_5"] = scores["hybrid"].recall[5] - scores["vector"].recall[5]
        console.print(table)
        from onecard.rag.answer import DEFAULT_MIN_SIMILARITY
        from onecard.rag.evaluate import OFFTOPIC_FILE, evaluate_refusals

        off = [q for q in OFFTOPIC_FILE.read_text().splitlines() if q.strip()]
        rs = evaluate_refusals(db, targets, off, DEFAULT_MIN_SIMILARITY)
        result.update({"idk_threshold": rs.threshold, "idk_in_domain_refused": rs.in_domain_refused,
                       "idk_off_topic_refused": rs.off_topic_refused, "idk_off_topic_questions": len(off),
                       "in_domain_min_best_similarity": rs.in_domain_min_similarity,
                       "off_topic_max_best_similarity": rs.off_topic_max_similarity})
        console.print(f"\"I don't know\" at cosine < {rs.threshold}: {rs.in_domain_refused:.1%} of real questions refused, "
                      f"{rs.off_topic_refused:.1%} of {len(off)} off-topic questions refused "
                      f"(real min {rs.in_domain_min_similarity:.2f}, off-topic max {rs.off_topic_max_similarity:.2f})")
        if model:
            sub = targets[:limit] if limit else targets
            cs = evaluate_citations(db, sub, model, progress=True)
            result.update({"citation_questions": cs.questions, "citation_answered": cs.answered,
                           "citation_with_any": cs.with_citation, "citation_accuracy": cs.accuracy,
                           "citation_invalid": cs.invalid_citations, "citation_model": str(Path(model).name)})
            console.print(f"citations ({Path(model).name}, {cs.questions} questions): {cs.answered} answered, "
                          f"{cs.with_citation} cite a passage, accuracy {cs.accuracy:.3f}, {cs.invalid_citations} invalid [n]")
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps({**run_facts(), **result}, indent=2) + "\n")
            console.print(f"wrote {out}")

    app.add_typer(rag, name="rag")
