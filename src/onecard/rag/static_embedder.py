"""A static embedder distilled from the bundled MiniLM (model2vec): a chunk is the weighted mean of its token vectors.

Why: on a 2-core CPU MiniLM embeds ~17 chunks/s of 1000 characters (~4.5 GFLOP
each); a static model does one table lookup per token and embeds hundreds of
chunks per second. model2vec's ``distill`` runs every vocabulary token through
MiniLM once, reduces the outputs with PCA and weights tokens by Zipf/SIF. It
loses context (word order, disambiguation), so vector-only recall drops; the
hybrid search keeps BM25 to make up for it (docs/rag.md has the figures).

The distilled model is built once (minutes on a CPU) and cached under the
onecard cache, like the test fixtures. We call ``model2vec.distill`` directly
rather than installing ``model2vec[distill]``, whose ``transformers<5.4`` pin
would downgrade the project's transformers; distillation is checked to work
with the installed version.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

STATIC_PCA_DIMS = 256
STATIC_EMBEDDER = f"static-all-MiniLM-L6-v2-pca{STATIC_PCA_DIMS}"  # the name an index records


def is_static_folder(path: Path) -> bool:
    """True for a model2vec folder (its config.json says ``model_type: model2vec``)."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "model2vec"
    except (json.JSONDecodeError, OSError):
        return False


def distill_static(source: Path, out: Path, pca_dims: int = STATIC_PCA_DIMS) -> Path:
    """Distill the sentence-transformers (or HF) folder ``source`` into a model2vec folder ``out``, atomically:
    written to a temporary sibling first, so an interrupted run never leaves a half model in the cache."""
    from onecard.errors import require_extra

    require_extra("model2vec", "rag")
    require_extra("skeletoken", "rag")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from model2vec.distill import distill

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = distill(str(source), pca_dims=pca_dims, device="cpu")
    model.save_pretrained(str(tmp))
    if out.exists():  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def static_model_dir() -> Path:
    """The cached MiniLM-distilled static model, distilled on first use (~6 min on a 2-core CPU, seconds on a GPU box)."""
    from onecard.rag.embeddings import default_model_dir
    from onecard.testing.checkpoints import cache_dir

    out = cache_dir() / f"rag-{STATIC_EMBEDDER}"
    if not (out / "model.safetensors").is_file():
        log.warning("distilling the static embedder from all-MiniLM-L6-v2 into %s (once; a few minutes on a CPU)", out)
        distill_static(default_model_dir(), out)
    return out
