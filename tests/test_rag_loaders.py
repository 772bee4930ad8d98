"""Loaders on real files made here: PDF (hand-written, and an encrypted one), HTML, Markdown, the directory walk."""

from __future__ import annotations

from pathlib import Path

import pytest

from onecard.errors import BadInputError
from onecard.rag.loaders import SkipFile, html_to_text, load_file, walk


def write_text_pdf(path: Path, pages: list[str]) -> Path:
    """A minimal valid PDF (Helvetica, one text line per page) with a correct xref table."""
    objs: list[bytes] = []
    n_pages = len(pages)
    # 1: catalog, 2: pages, 3: font, then (page, content) pairs
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(n_pages))
    objs.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objs.append(f"<< /Type /Pages /Kids [{kids}] /Count {n_pages} >>".encode())
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for i, text in enumerate(pages):
        esc = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 12 Tf 72 720 Td ({esc}) Tj ET".encode()
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                    f"/Contents {5 + 2 * i} 0 R >>".encode())
        objs.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for num, body in enumerate(objs, start=1):
        offsets.append(len(out))
        out += f"{num} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(bytes(out))
    return path


def test_pdf_text_per_page_with_page_numbers(tmp_path):
    pdf = write_text_pdf(tmp_path / "manual.pdf", ["The flux capacitor needs 1.21 gigawatts.", "Page two: calibration steps."])
    docs = load_file(pdf)
    assert [d.page for d in docs] == [1, 2]
    assert "flux capacitor" in docs[0].text and "calibration" in docs[1].text
    assert all(d.kind == "pdf" and d.source == pdf.resolve().as_posix() for d in docs)


def test_encrypted_pdf_is_reported_not_silently_dropped(tmp_path):
    from pypdf import PdfWriter

    w = PdfWriter()
    w.add_blank_page(200, 200)
    w.encrypt("secret", algorithm="RC4-128")
    w.write(tmp_path / "locked.pdf")
    (tmp_path / "ok.md").write_text("# Title\n\nSome words.\n")
    rep = walk(tmp_path)
    assert [Path(p).name for p, _ in rep.skipped] == ["locked.pdf"]
    assert "encrypted" in rep.skipped[0][1]
    assert [Path(f).name for f in rep.files] == ["ok.md"]


def test_html_main_text_with_headings():
    html = """<html><head><title>t</title><style>p{color:red}</style><script>var x = 1;</script></head>
    <body><nav><a href="/">Home</a> menu links</nav>
    <main><h1>Install  Guide</h1><p>Run the <b>installer</b> &amp; wait.</p>
    <h2>Troubleshooting</h2><ul><li>Check the cable</li><li>Reboot</li></ul></main>
    <footer>copyright</footer></body></html>"""
    text = html_to_text(html)
    assert "# Install Guide" in text and "## Troubleshooting" in text
    assert "Run the installer & wait." in text and "- Check the cable" in text
    for junk in ("var x", "color:red", "menu links", "copyright"):
        assert junk not in text


def test_markdown_text_and_code_kinds(tmp_path):
    (tmp_path / "a.md").write_text("# A\n\ntext\n")
    (tmp_path / "b.txt").write_text("plain\n")
    (tmp_path / "c.py").write_text("def f():\n    return 1\n")
    (tmp_path / "page.html").write_text("<h1>H</h1><p>body</p>")
    kinds = {Path(d.source).name: d.kind for d in walk(tmp_path).documents}
    assert kinds == {"a.md": "markdown", "b.txt": "text", "c.py": "code", "page.html": "html"}


def test_walk_globs_and_skip_reasons(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "keep.md").write_text("# keep\n")
    (tmp_path / "docs" / "draft.md").write_text("# draft\n")
    (tmp_path / "notes.txt").write_text("notes\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "blob.txt").write_bytes(b"abc\x00def")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD.txt").write_text("ref\n")
    rep = walk(tmp_path, include=["*.md", "*.txt", "*.png"], exclude=["docs/draft.md"])
    assert sorted(Path(f).name for f in rep.files) == ["keep.md", "notes.txt"]
    reasons = {Path(p).name: why for p, why in rep.skipped}
    assert set(reasons) == {"image.png", "latin1.txt", "blob.txt"}
    assert "unsupported" in reasons["image.png"] and "UTF-8" in reasons["latin1.txt"] and "binary" in reasons["blob.txt"]


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        walk(tmp_path / "nope")


def test_empty_file_is_skipped_with_reason(tmp_path):
    (tmp_path / "empty.md").write_text("  \n")
    with pytest.raises(SkipFile, match="empty"):
        load_file(tmp_path / "empty.md")
