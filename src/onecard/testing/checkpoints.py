"""Random-weight HF checkpoints built from real architectures' configs.

The folder is complete (config.json, model.safetensors, tokenizer), loads with
``transformers.AutoModelForCausalLM.from_pretrained`` and with onecard, and is
the stand-in for a user's downloaded model in every test and benchmark.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from onecard.models.arch import arch_config, scale_config


def cache_dir() -> Path:
    """Where fixtures are cached between runs (``ONECARD_CACHE`` overrides ~/.cache/onecard)."""
    root = Path(os.environ.get("ONECARD_CACHE", Path.home() / ".cache" / "onecard"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def shared_tokenizer(vocab_size: int) -> Path:
    """A BPE tokenizer of ``vocab_size`` trained on the local corpus, cached on disk."""
    from onecard.testing.corpus import local_corpus
    from onecard.testing.tokenizer import train_bpe_tokenizer

    out = cache_dir() / f"tokenizer-bpe-{vocab_size}"
    if not (out / "tokenizer.json").exists():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        train_bpe_tokenizer(local_corpus(max_bytes=2_000_000).train, vocab_size, tmp)
        publish_dir(tmp, out)
    return out


def publish_dir(tmp: Path, out: Path) -> None:
    """Move a finished cache folder into place atomically; if another process got there first, keep theirs.

    Test processes (pytest-xdist, several helpers, CI) build the same fixtures at
    once; deleting a published folder could pull it from under a reader.
    """
    try:
        tmp.rename(out)
    except OSError:  # ``out`` exists and is not empty: someone else published it
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _default_dtype(dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def hf_config(config: dict):
    """The transformers config object for ``config`` (a config.json dict; keys starting with ``_`` dropped)."""
    from transformers import AutoConfig

    # transformers edits nested dicts (rope_scaling) in place: give it a copy so the caller's config stays as written.
    return AutoConfig.for_model(**copy.deepcopy({k: v for k, v in config.items() if not k.startswith("_")}))


def hf_model_class(config: dict):
    """The HF class to build for ``config``: LLaVA's own class, else None (``AutoModelForCausalLM.from_config``)."""
    if config.get("model_type") == "llava":
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration
    return None


def build_random_model(config: dict, dtype: str = "float32", device: str = "cpu", seed: int = 0):
    """An HF model with random weights for ``config`` (a config.json dict), in ``dtype`` on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    hf_cfg = hf_config(config)
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    cls = hf_model_class(config)
    with _default_dtype(torch_dtype), torch.device(device):
        model = cls(hf_cfg) if cls else AutoModelForCausalLM.from_config(hf_cfg)
    return model.to(dtype=torch_dtype).eval()


def write_config(out: Path, config: dict, dtype: str) -> None:
    """Rewrite ``out/config.json`` (as transformers saved it) to keep the config exactly as the architecture declares
    it, plus the dtype actually stored."""
    saved = json.loads((out / "config.json").read_text())
    saved.update(config)
    saved["torch_dtype"] = dtype
    saved.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(saved, indent=2))


def copy_tokenizer(out: Path, config: dict) -> None:
    """Put the shared test tokenizer (capped at 4096 tokens, inside every vocabulary) into ``out``."""
    text_cfg = config.get("text_config", config)
    tok = shared_tokenizer(min(text_cfg["vocab_size"], 4096))
    for f in tok.iterdir():
        shutil.copy(f, out / f.name)


def _arch_config(arch: str, size: str, overrides: dict | None) -> dict:
    config = scale_config(arch_config(arch), size)
    config.update(overrides or {})
    config.pop("_onecard_source", None)
    return config


def _target_dirs(path: str | Path | None, name: str, key: list) -> tuple[Path, Path | None]:
    """(the folder to return, the folder to write or None when the cached one exists).

    Without ``path`` the folder is cached as ``name-<hash of key>`` (keyed by the exact config, so a change to the
    built-in configs or the scaling rules never reuses a stale folder) and written beside it first, then published.
    """
    if path is not None:
        return Path(path), Path(path)
    tag = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    final = cache_dir() / f"{name}-{tag}"
    if (final / "config.json").exists():
        return final, None
    out = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(out, ignore_errors=True)
    return final, out


def make_random_checkpoint(arch: str, size: str = "tiny", path: str | Path | None = None, *, dtype: str = "float32",
                           seed: int = 0, device: str = "cpu", tokenizer: bool = True,
                           overrides: dict | None = None) -> Path:
    """Write a random-weight HF folder for built-in ``arch`` ('llama-2-7b', ...) at ``size`` (full/small/tiny).

    ``overrides`` patches the config (e.g. ``{"num_hidden_layers": 1}``). Returns the folder.
    """
    config = _arch_config(arch, size, overrides)
    final, out = _target_dirs(path, f"random-{arch}-{size}-{dtype}-s{seed}", [config, tokenizer])
    if out is None:
        return final
    model = build_random_model(config, dtype=dtype, device=device, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    write_config(out, config, dtype)
    if tokenizer:
        copy_tokenizer(out, config)
    if out != final:
        publish_dir(out, final)
    return final


def fast_random_checkpoint(arch: str, size: str = "full", path: str | Path | None = None, *, dtype: str = "bfloat16",
                           seed: int = 0, device: str = "cpu", tokenizer: bool = True, overrides: dict | None = None,
                           shard_bytes: int | None = None) -> Path:
    """Like ``make_random_checkpoint`` but drawn tensor by tensor (``fast_checkpoint.py``): seconds for a 13B, not minutes.

    Same config.json, keys and tokenizer; the weights are other random draws of the same kinds, so the folders
    are cached under their own ``random-fast-`` names. ``device`` is where the tensors are drawn (cuda: fastest).
    """
    from onecard.testing.fast_checkpoint import (
        DEFAULT_SHARD_BYTES,
        write_fast_random_checkpoint,
    )

    config = _arch_config(arch, size, overrides)
    shard_bytes = shard_bytes or DEFAULT_SHARD_BYTES
    final, out = _target_dirs(path, f"random-fast-{arch}-{size}-{dtype}-s{seed}", [config, tokenizer, shard_bytes])
    if out is None:
        return final
    write_fast_random_checkpoint(config, out, dtype, device, seed, tokenizer, shard_bytes)
    if out != final:
        publish_dir(out, final)
    return final


def gpu_benchmark_checkpoint(arch: str = "llama-2-7b", console=None) -> Path:
    """The full-size random bf16 checkpoint GPU benchmarks share: drawn on the GPU shard by shard, cached."""
    if console is not None:
        console.print(f"[dim]writing (or reusing) the random {arch} bf16 checkpoint from the GPU...[/]")
    t0 = time.perf_counter()
    path = fast_random_checkpoint(arch, "full", dtype="bfloat16", device="cuda")
    if console is not None:
        console.print(f"[dim]{path.name} ready ({time.perf_counter() - t0:.0f} s)[/]")
    return path


def benchmark_model(model: str | None, arch: str, console=None) -> str:
    """A GPU benchmark's model folder: ``--model`` when given, else the shared random ``arch`` checkpoint.

    Exits with one line on a machine without CUDA (every GPU benchmark has a ``--smoke`` for the CPU)."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --smoke on CPU")
    return model if model is not None else str(gpu_benchmark_checkpoint(arch, console))
