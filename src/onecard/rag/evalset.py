"""The packaged evaluation set: questions over Python stdlib modules, each with its known source passage.

How it is made (``build_stdlib_questions``): for every function, method and
class with a docstring in ``STDLIB_FILES``, the docstring's first sentence
is turned into a question by a fixed template (``Return the x`` ->
``In module m, which function returns the x?``); the target passage is the
definition line through the end of its docstring. Only sentences of 6+ words
that are unique in the corpus are kept, at most ``per_file`` per file. The
result is written to ``eval/stdlib_questions.jsonl`` and committed; the
evaluator relocates each passage with ``ast`` by its qualified name, so the
set survives small differences between Python versions (a question whose
symbol is gone is reported, not silently dropped).

Known weakness: template questions reuse the docstring's words, which favours
BM25 over embeddings; real users paraphrase more. See docs/rag.md.
"""

from __future__ import annotations

import ast
import json
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

EVAL_DIR = Path(__file__).resolve().parent / "eval"
QUESTIONS_FILE = EVAL_DIR / "stdlib_questions.jsonl"

# ~640 KB of stdlib modules (~800 chunks at 1000/200): big enough that every question has hundreds of distractors.
STDLIB_FILES = ("json/decoder.py", "json/encoder.py", "json/__init__.py", "queue.py", "heapq.py", "bisect.py",
                "textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "shutil.py", "tempfile.py", "string.py",
                "statistics.py", "contextlib.py", "functools.py", "secrets.py", "base64.py", "gzip.py", "calendar.py",
                "pathlib.py", "random.py", "copy.py", "csv.py", "getpass.py", "hmac.py", "configparser.py",
                "dataclasses.py")

_THIRD_PERSON_ES = ("s", "x", "z", "ch", "sh", "o")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _third_person(verb: str) -> str | None:
    v = verb.lower()
    if not v.isalpha() or len(v) < 3 or v.endswith(("ing", "ed", "s")) or v in ("the", "this", "that", "and", "for"):
        return None
    if v.endswith("y") and v[-2] not in "aeiou":
        return v[:-1] + "ies"
    if v.endswith(_THIRD_PERSON_ES):
        return v + "es"
    return v + "s"


_IMPERATIVE = frozenset("""return convert create make build compute calculate find get set read write open close parse
format encode decode split join copy move remove delete add insert pop push check test raise yield wrap fill shorten
dedent indent quote escape unescape expand match filter sort merge search replace generate choose shuffle sample
apply call run handle load dump store update register reset initialize decorate validate extract strip
compare compile construct emulate transform translate iterate produce emit send receive flush truncate""".split())


def question_for(module: str, kind: str, sentence: str) -> str | None:
    """Template question from a docstring's first sentence; None when no template fits."""
    words = sentence.rstrip(".").split()
    if len(words) < 6:
        return None
    first = words[0].lower()
    rest = " ".join(words[1:])
    if first in _IMPERATIVE:
        verb = _third_person(first)
        if verb:
            return f"In the {module} module, which {kind} {verb} {rest}?"
    if first in ("a", "an", "the"):
        phrase = " ".join(words)
        return f"In the {module} module, which {kind} is {phrase[0].lower()}{phrase[1:]}?"
    return None


@dataclass(frozen=True)
class Passage:
    file: str        # path relative to the stdlib root
    symbol: str      # qualified name, e.g. "JSONDecoder.decode"
    start: int       # character offsets in the file: def line .. end of docstring
    end: int


def _line_offsets(text: str) -> list[int]:
    offs, pos = [0], 0
    for line in text.splitlines(keepends=True):
        pos += len(line)
        offs.append(pos)
    return offs


def _definitions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            yield name, node
            if isinstance(node, ast.ClassDef):
                yield from _definitions(node, name + ".")


def locate(file: str, symbol: str, root: Path | None = None) -> Passage | None:
    """Character span (def line .. docstring end) of ``symbol`` in stdlib ``file``; None if it no longer exists."""
    path = (root or stdlib_root()) / file
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    offs = _line_offsets(text)
    for name, node in _definitions(ast.parse(text)):
        if name == symbol:
            body0 = node.body[0] if node.body else node
            end_line = getattr(body0, "end_lineno", node.lineno)
            start_line = node.lineno  # the def/class line itself (decorators excluded)
            return Passage(file, symbol, offs[start_line - 1], offs[min(end_line, len(offs) - 1)])
    return None


def build_stdlib_questions(per_file: int = 8, files: tuple[str, ...] = STDLIB_FILES) -> list[dict]:
    """Questions (dicts) for ``files``; deterministic for a given Python version."""
    root = stdlib_root()
    candidates: list[dict] = []
    sentence_count: dict[str, int] = {}
    for file in files:
        path = root / file
        if not path.is_file():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module = file.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for name, node in _definitions(tree):
            if name.split(".")[-1].startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            para = " ".join(doc.strip().split("\n\n")[0].split())
            m = re.match(r"(.+?[.!?])(\s|$)", para)
            sentence = (m.group(1) if m else para).strip()
            sentence_count[sentence.lower()] = sentence_count.get(sentence.lower(), 0) + 1
            kind = "class" if isinstance(node, ast.ClassDef) else ("method" if "." in name else "function")
            q = question_for(module, kind, sentence)
            if q:
                candidates.append({"question": q, "file": file, "symbol": name, "docstring_first_sentence": sentence})
    out, per = [], {}
    for c in candidates:
        if sentence_count[c["docstring_first_sentence"].lower()] > 1 or per.get(c["file"], 0) >= per_file:
            continue
        per[c["file"]] = per.get(c["file"], 0) + 1
        out.append({"id": f"q{len(out) + 1:03d}", **c})
    return out


def write_questions(questions: list[dict], path: Path = QUESTIONS_FILE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(q, sort_keys=True) + "\n" for q in questions))
    return path


STDLIB_EXCLUDE = ["site-packages/*", "dist-packages/*", "test/*", "idlelib/*", "tkinter/*", "__pycache__/*"]


def index_stdlib_corpus(db: str | Path, progress: bool = False, embedder: str | None = None):
    """Index the evaluation corpus (``STDLIB_FILES`` of this Python) into ``db``; returns the IndexReport."""
    from onecard.rag.indexer import index_directory

    return index_directory(stdlib_root(), db, include=list(STDLIB_FILES), exclude=STDLIB_EXCLUDE, progress=progress,
                           embedder=embedder)


if __name__ == "__main__":  # regenerate: PYTHONPATH=src python -m onecard.rag.evalset
    qs = build_stdlib_questions()
    print(f"{len(qs)} questions -> {write_questions(qs)}")
