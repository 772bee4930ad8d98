"""Demo stage: index the project's docs (and README), answer one question with citations using the tiny model.

The tiny model (~5M params, trained on stdlib code) writes a weak answer; the
stage prints it as it is, together with the retrieved passages, which are the
part that works at this size.
"""

from __future__ import annotations

from pathlib import Path

from onecard.demo import DemoContext, StageResult

QUESTION = "How does onecard answer questions from local documents with citations?"


def _docs_folder(ctx: DemoContext) -> Path:
    """Copy README.md and docs/**/*.md into a scratch folder (the installed package may lack the repo)."""
    repo = Path(__file__).resolve().parents[3]
    out = ctx.workdir / "rag_docs"
    out.mkdir(parents=True, exist_ok=True)
    sources = [repo / "README.md", *sorted((repo / "docs").rglob("*.md"))] if (repo / "docs").is_dir() else []
    for src in sources:
        if src.is_file():
            rel = src.relative_to(repo).as_posix().replace("/", "__")
            (out / rel).write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    if not any(out.iterdir()):
        # no repository around (installed wheel): fall back to this package's own module docstrings
        for py in sorted(Path(__file__).resolve().parent.glob("*.py")):
            (out / f"{py.stem}.py").write_text(py.read_text(encoding="utf-8"), encoding="utf-8")
    return out


def demo_stage(ctx: DemoContext) -> StageResult:
    from onecard.rag.answer import ask
    from onecard.rag.indexer import index_directory

    folder = _docs_folder(ctx)
    db = ctx.workdir / "rag_demo.sqlite"
    rep = index_directory(folder, db)
    ctx.artifacts["rag_db"] = db
    model = ctx.artifacts.get("model_dir")
    ans = ask(QUESTION, db, model=model, k=3, max_tokens=48) if model else None
    if ans is None:
        from onecard.rag.store import search

        hits = search(QUESTION, db, k=3).hits
        sources = [f"[{n}] {Path(h.chunk.source).name} > {h.chunk.heading}" for n, h in enumerate(hits, start=1)]
        text = "(no model in this demo run: retrieval only)"
    else:
        sources = [f"[{c.n}] {Path(c.source).name} > {c.heading} (cos {c.similarity:.2f})" for c in ans.context]
        text = ans.text
    ctx.console.print(f"[dim]Q:[/] {QUESTION}\n[dim]A (tiny model, weak by design):[/] {text[:300]}", highlight=False)
    for line in sources:
        ctx.console.print(f"   {line}", highlight=False)
    cited = len(ans.citations) if ans else 0
    return StageResult("rag", f"indexed {rep.files_seen} files -> {rep.total_chunks} chunks "
                       f"({rep.chunks_per_s:.0f} chunks/s); top source {sources[0] if sources else 'none'}; "
                       f"answer cites {cited} passage(s)")
