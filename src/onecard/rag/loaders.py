"""Documents on disk -> ``Document`` objects (one per file, one per page for PDFs).

Every file the walk meets is either loaded or listed in ``LoadReport.skipped``
with a reason (encrypted PDF, not UTF-8, binary, unsupported type, unreadable):
nothing is dropped silently. HTML becomes text with its headings written as
Markdown ``#`` lines, so the splitter treats Markdown and HTML structure alike.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from onecard.errors import BadInputError

log = logging.getLogger(__name__)

MARKDOWN_EXT = {".md", ".markdown", ".mdx"}
HTML_EXT = {".html", ".htm", ".xhtml"}
TEXT_EXT = {".txt", ".rst", ".text", ".log", ".csv", ".tsv"}
CODE_EXT = {".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".js", ".ts", ".tsx", ".jsx", ".go", ".rs",
            ".java", ".kt", ".scala", ".rb", ".sh", ".bash", ".lua", ".sql", ".toml", ".yaml", ".yml", ".ini", ".cfg"}
PDF_EXT = {".pdf"}
SUPPORTED_EXT = MARKDOWN_EXT | HTML_EXT | TEXT_EXT | CODE_EXT | PDF_EXT
DEFAULT_EXCLUDE = (".git/*", "*/.git/*", "*/__pycache__/*", "__pycache__/*", "*/node_modules/*", "node_modules/*",
                   ".venv/*", "*/.venv/*")


@dataclass(frozen=True)
class Document:
    """Text of one file (or one PDF page). ``kind`` picks the splitter's structure rules."""

    source: str          # absolute posix path
    text: str
    kind: str            # "markdown" | "html" | "text" | "code" | "pdf"
    page: int | None = None  # 1-based PDF page number


@dataclass
class LoadReport:
    documents: list[Document] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    files: list[str] = field(default_factory=list)  # every file loaded (absolute posix paths)


class SkipFile(Exception):
    """A file that cannot be indexed; the message is the reason shown to the user."""


def kind_of(path: Path) -> str | None:
    ext = path.suffix.lower()
    for kind, exts in (("pdf", PDF_EXT), ("markdown", MARKDOWN_EXT), ("html", HTML_EXT), ("text", TEXT_EXT),
                       ("code", CODE_EXT)):
        if ext in exts:
            return kind
    return None


def load_file(path: str | Path) -> list[Document]:
    """Load one file; raises ``SkipFile`` with the reason when it cannot be read as text."""
    path = Path(path).resolve()
    kind = kind_of(path)
    if kind is None:
        raise SkipFile(f"unsupported file type '{path.suffix or path.name}'")
    source = path.as_posix()
    if kind == "pdf":
        return _load_pdf(path)
    text = _read_text(path)
    if kind == "html":
        text = html_to_text(text)
    if not text.strip():
        raise SkipFile("empty file (no text)")
    return [Document(source, text, kind)]


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise SkipFile(f"unreadable: {err.strerror or err}") from err
    if b"\x00" in raw[:8192]:
        raise SkipFile("binary content (NUL bytes)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SkipFile(f"not UTF-8 text (byte {err.start}); convert it to UTF-8") from err


def _load_pdf(path: Path) -> list[Document]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            try:  # many "encrypted" PDFs only carry an owner password and open with an empty user password
                ok = reader.decrypt("")
            except Exception as err:  # pypdf raises several types (missing crypto lib, bad key)
                raise SkipFile(f"encrypted PDF ({err})") from err
            if not ok:
                raise SkipFile("encrypted PDF (needs a password)")
        pages = [page.extract_text() or "" for page in reader.pages]
    except SkipFile:
        raise
    except (PdfReadError, OSError, ValueError, KeyError) as err:
        raise SkipFile(f"unreadable PDF: {err}") from err
    docs = [Document(path.as_posix(), text, "pdf", page=i + 1) for i, text in enumerate(pages) if text.strip()]
    if not docs:
        raise SkipFile("PDF has no extractable text (scanned images need OCR first)")
    return docs


def _matches(rel: str, patterns: tuple[str, ...] | list[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)


def find_files(root: str | Path, include: list[str] | None = None, exclude: list[str] | None = None) -> list[Path]:
    """Files under ``root`` (or ``root`` itself if it is a file) that pass the globs, sorted, resolved.

    ``include``/``exclude`` are shell globs matched against the path relative
    to ``root`` and against the file name (``*.md``, ``docs/*``); excludes win.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise BadInputError(f"'{root}' does not exist; pass a folder (or file) of documents to index")
    if root.is_file():
        return [root.resolve()]
    base = root.resolve()
    excludes = tuple(DEFAULT_EXCLUDE) + tuple(exclude or ())
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(base):
        # prune excluded folders ("site-packages/*" matches "site-packages/") instead of walking them
        rel_dir = Path(dirpath).relative_to(base).as_posix()
        dirnames[:] = sorted(d for d in dirnames
                             if not _matches(f"{d}/" if rel_dir == "." else f"{rel_dir}/{d}/", excludes))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(base).as_posix()
            if _matches(rel, excludes) or (include and not _matches(rel, include)):
                continue
            out.append(path)
    return out


def walk(root: str | Path, include: list[str] | None = None, exclude: list[str] | None = None) -> LoadReport:
    """Load every file ``find_files`` selects; unloadable ones go to ``skipped`` with the reason."""
    report = LoadReport()
    for path in find_files(root, include, exclude):
        try:
            docs = load_file(path)
        except SkipFile as why:
            report.skipped.append((path.as_posix(), str(why)))
            log.info("skipped %s: %s", path, why)
            continue
        report.documents.extend(docs)
        report.files.append(path.as_posix())
    return report


# --- HTML -> text with headings -------------------------------------------------------------

_SKIP_TAGS = {"script", "style", "noscript", "template", "svg", "nav", "header", "footer", "aside", "form", "button"}
_BLOCK_TAGS = {"p", "div", "section", "article", "main", "br", "tr", "table", "ul", "ol", "dl", "dt", "dd",
               "blockquote", "figure", "figcaption", "hr", "li", "pre"}
_HEADINGS = {f"h{i}": i for i in range(1, 7)}
_VOID = {"br", "hr", "img", "meta", "link", "input", "wbr", "source", "area", "base", "col", "embed", "param", "track"}


class _HTMLText(HTMLParser):
    """Collects visible text; remembers which parts lie inside <main>/<article> (the page's main text)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[tuple[str, bool]] = []  # (text, inside main/article)
        self.skip_depth = 0
        self.main_depth = 0
        self.pre_depth = 0
        self.heading: int | None = None
        self.heading_buf: list[str] = []

    def _emit(self, text: str) -> None:
        self.parts.append((text, self.main_depth > 0))

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP_TAGS and tag not in _VOID:
            self.skip_depth += 1
            return
        if tag in ("main", "article"):
            self.main_depth += 1
        if tag == "pre":
            self.pre_depth += 1
        if tag in _HEADINGS and not self.skip_depth:
            self.heading, self.heading_buf = _HEADINGS[tag], []
        elif tag == "li" and not self.skip_depth:
            self._emit("\n- ")
        elif tag in _BLOCK_TAGS and not self.skip_depth:
            self._emit("\n\n" if tag in ("p", "pre", "table", "blockquote") else "\n")

    def handle_endtag(self, tag):
        if tag in _SKIP_TAGS and tag not in _VOID:
            self.skip_depth = max(0, self.skip_depth - 1)
            return
        if tag in _HEADINGS and self.heading is not None:
            title = " ".join("".join(self.heading_buf).split())
            if title:
                self._emit(f"\n\n{'#' * self.heading} {title}\n\n")
            self.heading = None
        elif tag in _BLOCK_TAGS and not self.skip_depth:
            self._emit("\n\n" if tag in ("p", "pre", "table", "blockquote") else "\n")
        if tag == "pre":
            self.pre_depth = max(0, self.pre_depth - 1)
        if tag in ("main", "article"):
            self.main_depth = max(0, self.main_depth - 1)

    def handle_data(self, data):
        if self.skip_depth:
            return
        if self.heading is not None:
            self.heading_buf.append(data)
        elif self.pre_depth:
            self._emit(data)
        else:
            collapsed = " ".join(data.split())
            if not collapsed:
                self._emit(" " if data else "")
            else:  # keep one space where the source had whitespace at either end
                self._emit((" " if data[0].isspace() else "") + collapsed + (" " if data[-1].isspace() else ""))


def html_to_text(html: str) -> str:
    """Main text of an HTML page; headings become ``#`` lines. Uses only <main>/<article> when the page has one."""
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    has_main = any(in_main and t.strip() for t, in_main in parser.parts)
    text = "".join(t for t, in_main in parser.parts if in_main or not has_main)
    lines = [line.strip() if not line.startswith("    ") else line.rstrip() for line in text.splitlines()]
    out: list[str] = []
    for line in lines:  # collapse runs of blank lines to one
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip() + "\n"
