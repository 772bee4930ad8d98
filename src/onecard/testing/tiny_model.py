"""A ~5M-parameter Llama trained on the local corpus: the project's own "real" model.

Random weights say nothing about quality; this model does: quantization and
training quality checks compare perplexities on its validation split. Trained
with plain HF transformers + AdamW on CPU in a few minutes, cached on disk
(keyed by every setting and the Python version, since the corpus is the stdlib).
The loop is ``train_lm``'s, shared with the benchmarks' larger models.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

from onecard.testing.checkpoints import (
    build_random_model,
    cache_dir,
    publish_dir,
    shared_tokenizer,
)
from onecard.testing.corpus import local_corpus
from onecard.testing.train_lm import save_float_folder, train_lm

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 1024, "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "hidden_act": "silu", "initializer_range": 0.02, "attention_bias": False, "mlp_bias": False,
}


@dataclass(frozen=True)
class TinyModelInfo:
    path: Path
    parameters: int
    steps: int
    seq_len: int
    train_seconds: float
    val_perplexity: float
    untrained_val_perplexity: float
    protocol: str


def _tokens(tokenizer, docs) -> object:
    import torch

    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer.encode(d, add_special_tokens=False))
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _val_ppl(model, val_ids, seq_len: int):
    from onecard.bench.perplexity import hf_logits_fn, sliding_window_perplexity

    return sliding_window_perplexity(hf_logits_fn(model), val_ids, context=seq_len, stride=seq_len // 2,
                                     max_tokens=40_000)


def train_tiny_model(steps: int = 300, seq_len: int = 256, batch_size: int = 8, lr: float = 3e-3, seed: int = 0,
                     progress: bool = False) -> TinyModelInfo:
    """Train (or load from cache) the tiny model; returns its folder and measured perplexities."""
    import torch
    from transformers import AutoTokenizer

    key = json.dumps([TINY_CONFIG, steps, seq_len, batch_size, lr, seed, sysconfig.get_python_version(), 1])
    out = cache_dir() / f"tiny-llama-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    info_file = out / "onecard_tiny.json"
    if info_file.exists():
        info = json.loads(info_file.read_text())
        return TinyModelInfo(**{**info, "path": out})

    torch.manual_seed(seed)
    tok_dir = shared_tokenizer(TINY_CONFIG["vocab_size"])
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    corpus = local_corpus()
    train_ids = _tokens(tokenizer, corpus.train)
    val_ids = _tokens(tokenizer, corpus.validation)
    model = build_random_model(TINY_CONFIG, seed=seed).train()
    untrained = _val_ppl(model.eval(), val_ids, seq_len).perplexity
    model.train()
    seconds = train_lm(model, train_ids, steps, seq_len, batch_size, lr, generator=torch.Generator().manual_seed(seed),
                       progress=progress, label="training tiny model")
    model.eval()
    ppl = _val_ppl(model, val_ids, seq_len)
    # Several test processes may train at once: each writes its own temp folder, the first rename wins.
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_float_folder(model, tok_dir, tmp)
    info = TinyModelInfo(out, sum(p.numel() for p in model.parameters()), steps, seq_len, round(seconds, 1),
                         round(ppl.perplexity, 3), round(untrained, 1), ppl.protocol())
    (tmp / "onecard_tiny.json").write_text(json.dumps({**asdict(info), "path": None}, indent=2))
    publish_dir(tmp, out)
    return info
