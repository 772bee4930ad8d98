"""Real text every machine has: the Python standard library's own source and docstrings.

Deterministic for a given Python version: files are sorted and assigned to the
validation split by a stable hash of their relative path (~5%).
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__",
              "ensurepip", "tkinter", "pydoc_data", "encodings"}


@dataclass(frozen=True)
class Corpus:
    train: tuple[str, ...]
    validation: tuple[str, ...]
    source: str

    def train_text(self) -> str:
        return "\n\n".join(self.train)

    def validation_text(self) -> str:
        return "\n\n".join(self.validation)


def _is_validation(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 20 == 0


@lru_cache(maxsize=4)
def local_corpus(max_bytes: int = 6_000_000, max_file_bytes: int = 200_000) -> Corpus:
    """Up to ``max_bytes`` of stdlib ``.py`` files, one document per file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train: list[str] = []
    val: list[str] = []
    total = 0
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        if _SKIP_DIRS.intersection(rel.split("/")[:-1]):
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or len(text) > max_file_bytes:
            continue
        (val if _is_validation(rel) else train).append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return Corpus(tuple(train), tuple(val), f"Python {sysconfig.get_python_version()} stdlib at {root}")
