"""A trained small model grown to a real architecture's depth and vocabulary, computing exactly what it did.

Why: a speed measurement needs a real architecture's bytes and FLOPs, and some
(speculative decoding) also need a model that behaves like a trained one — a
random model never copies, so nothing it drafts is accepted. No weights can be
downloaded and a 32-layer model cannot be trained here in minutes, but a
4-layer model at the architecture's widths can (``benchmarks/engine_speculative.py``).

``grow_checkpoint`` appends decoder layers whose query/key/value and gate/up
weights are random (so every added layer's attention and MLP run on real,
non-zero values, reading and writing its own KV cache) and whose output
projections (``o_proj``, ``down_proj``) are zero: each added layer adds exactly
0 to the residual stream, so the grown model's logits are the trained model's.
Dense kernels (cuBLAS, onecard's GEMV, attention) take the same time whatever
the values, so a step costs what the full architecture's step costs. New
vocabulary rows copy row 0 of the embedding and ``lm_head``: their logits tie
token 0's, and greedy argmax (first maximum) never picks them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from onecard.errors import BadInputError
from onecard.testing.fast_checkpoint import DEFAULT_SHARD_BYTES

ZEROED = ("self_attn.o_proj.", "mlp.down_proj.")  # an added layer's outputs: zero keeps the residual stream as it was
VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


def _read_tensors(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise BadInputError(f"no *.safetensors in {src}: grow_checkpoint needs a saved HF folder")
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def _layer_kind(suffix: str) -> str:
    """How an added layer's tensor ``suffix`` (name after ``model.layers.N.``) starts: zeros, ones or random."""
    if suffix.startswith(ZEROED):
        return "zeros"
    return "ones" if "norm" in suffix else "normal"


def grow_checkpoint(src: str | Path, out: str | Path, num_layers: int, vocab_size: int | None = None, *,
                    seed: int = 0, device: str = "cpu", shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``src`` (a Llama-family HF folder) grown to ``num_layers`` decoder layers and ``vocab_size`` rows
    into ``out`` (see the module docstring); returns ``out``. Host memory: ``src``'s weights plus one shard."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    config = json.loads((src / "config.json").read_text())
    layers, vocab = config["num_hidden_layers"], config["vocab_size"]
    vocab_size = vocab_size or vocab
    if num_layers < layers or vocab_size < vocab:
        raise BadInputError(f"cannot grow {src.name} ({layers} layers, vocab {vocab}) to {num_layers} layers, "
                            f"vocab {vocab_size}: growing only adds layers and rows")
    old = _read_tensors(src)
    prefix = "model.layers.0."
    layer0 = {k[len(prefix):]: v for k, v in old.items() if k.startswith(prefix)}
    if not layer0:
        raise BadInputError(f"{src.name} has no '{prefix}*' tensors: grow_checkpoint handles Llama-family layouts")
    shapes = dict(old)
    shapes.update({f"model.layers.{i}.{s}": v for i in range(layers, num_layers) for s, v in layer0.items()})
    for name in VOCAB_ROWS:
        if name in shapes:
            shapes[name] = torch.empty((vocab_size, *old[name].shape[1:]), dtype=old[name].dtype, device="meta")
    std = float(config.get("initializer_range", 0.02))
    generator = torch.Generator(device=device).manual_seed(seed)

    def tensor(name: str) -> torch.Tensor:
        if name in VOCAB_ROWS and name in old:
            t = old[name]
            return torch.cat([t, t[:1].expand(vocab_size - t.shape[0], *t.shape[1:])]) if vocab_size > vocab else t
        if name in old:
            return old[name]
        ref = shapes[name]
        kind = _layer_kind(name.split(".", 3)[3])
        if kind == "zeros":
            return torch.zeros(ref.shape, dtype=ref.dtype)
        if kind == "ones":
            return torch.ones(ref.shape, dtype=ref.dtype)
        return torch.empty(ref.shape, dtype=ref.dtype, device=device).normal_(0.0, std, generator=generator).cpu()

    out.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(
        {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in shapes.items()},
        filename_pattern="model{suffix}.safetensors", max_shard_size=shard_bytes)
    for fname, names in split.filename_to_tensors.items():
        save_file({n: tensor(n).contiguous() for n in names}, str(out / fname), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model") and f.name != "config.json":
            shutil.copy(f, out / f.name)
    config.update(num_hidden_layers=num_layers, vocab_size=vocab_size)
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] += config["layer_types"][-1:] * (num_layers - layers)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "onecard_grown.json").write_text(json.dumps(
        {"from": str(src), "layers": [layers, num_layers], "vocab_size": [vocab, vocab_size], "seed": seed}, indent=2))
    return out
