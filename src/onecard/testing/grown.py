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

``widen_checkpoint`` grows the widths instead (hidden size, MLP, attention
heads), for when only a narrow model learns the behaviour in the time there is
(the speculative benchmark's copy model: 85 % of edited-block tokens right at
1024 wide, 33 % at Llama-3-8B's widths, same steps). The trained weights fill
the top-left corner of each wider matrix; the residual stream's new dimensions
stay exactly zero (zero embedding columns, zero output rows), new query heads
and MLP units compute on random weights but their output projections are zero,
and the norms' weights and epsilon are scaled by ``old / new`` hidden size
(square root for the weights) so each RMSNorm, now averaging over zeros too,
returns what it did. Each trained query head keeps its KV head: head ``q`` of
group ``j`` becomes head ``q`` of new group ``j``.
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


def _write_folder(src: Path, out: Path, tensors: dict[str, torch.Tensor], make, config: dict, note: dict,
                  shard_bytes: int) -> Path:
    """Save ``make(name)`` for every name of ``tensors`` (shapes only: meta tensors are fine) as ``out``'s shards,
    with ``config``, ``src``'s other files (tokenizer, ...) and ``note`` in ``onecard_grown.json``."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(
        {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in tensors.items()},
        filename_pattern="model{suffix}.safetensors", max_shard_size=shard_bytes)
    for fname, names in split.filename_to_tensors.items():
        save_file({n: make(n).contiguous() for n in names}, str(out / fname), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model") and f.name not in ("config.json", "onecard_grown.json"):
            shutil.copy(f, out / f.name)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "onecard_grown.json").write_text(json.dumps(note, indent=2))
    return out


def _read_tensors(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise BadInputError(f"no *.safetensors in {src}: rewriting a model needs a saved HF folder")
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

    config.update(num_hidden_layers=num_layers, vocab_size=vocab_size)
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] += config["layer_types"][-1:] * (num_layers - layers)
    return _write_folder(src, out, shapes, tensor, config, {"from": str(src), "layers": [layers, num_layers],
                                                            "vocab_size": [vocab, vocab_size], "seed": seed},
                         shard_bytes)


def widen_checkpoint(src: str | Path, out: str | Path, hidden_size: int, intermediate_size: int, num_heads: int,
                     num_kv_heads: int, *, seed: int = 0, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``src`` (a Llama-family HF folder without biases) at these widths into ``out``, computing exactly what
    it did (see the module docstring); the head size stays. Returns ``out``."""
    src, out = Path(src), Path(out)
    config = json.loads((src / "config.json").read_text())
    h, i = config["hidden_size"], config["intermediate_size"]
    H, Hk = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    D = config.get("head_dim") or h // H
    group, new_group = H // Hk, num_heads // max(num_kv_heads, 1)
    if (hidden_size < h or intermediate_size < i or num_kv_heads < Hk or num_heads % num_kv_heads
            or new_group < group or hidden_size != num_heads * D):
        raise BadInputError(f"cannot widen {src.name} (hidden {h}, MLP {i}, {H} heads / {Hk} KV heads of {D}) to "
                            f"hidden {hidden_size}, MLP {intermediate_size}, {num_heads} / {num_kv_heads} heads: "
                            "widening keeps the head size and only adds width, KV heads and heads per group")
    old = _read_tensors(src)
    if any(k.endswith(".bias") for k in old):
        raise BadInputError(f"{src.name} has bias tensors: widen_checkpoint handles bias-free Llama layouts")
    std = float(config.get("initializer_range", 0.02))
    generator = torch.Generator().manual_seed(seed)
    # new query-head index of each trained query head: same KV head, same place in its group
    q_heads = torch.tensor([(q // group) * new_group + q % group for q in range(H)])
    q_rows = (q_heads[:, None] * D + torch.arange(D)).reshape(-1)
    norm_scale = (h / hidden_size) ** 0.5

    def shape(name: str, t: torch.Tensor) -> tuple[int, ...]:
        if t.dim() == 1:
            return (hidden_size,)
        rows = {"q_proj": num_heads * D, "k_proj": num_kv_heads * D, "v_proj": num_kv_heads * D,
                "gate_proj": intermediate_size, "up_proj": intermediate_size}
        kind = name.split(".")[-2]
        if kind in rows:
            return rows[kind], hidden_size
        if kind == "o_proj":
            return hidden_size, num_heads * D
        if kind == "down_proj":
            return hidden_size, intermediate_size
        return t.shape[0], hidden_size  # embed_tokens, lm_head: new columns

    def make(name: str) -> torch.Tensor:
        t, kind = old[name], name.split(".")[-2]
        new_shape = shape(name, t)
        if t.dim() == 1:  # an RMSNorm weight
            return torch.cat([t * norm_scale, torch.ones(hidden_size - h, dtype=t.dtype)])
        random_rows = kind in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
        w = (torch.empty(new_shape).normal_(0.0, std, generator=generator) if random_rows
             else torch.zeros(new_shape)).to(t.dtype)
        if kind == "q_proj":
            w[q_rows, :h] = t
        elif kind == "o_proj":
            w[:h, q_rows] = t
        else:
            w[:t.shape[0], :t.shape[1]] = t
        return w

    config.update(hidden_size=hidden_size, intermediate_size=intermediate_size, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads, head_dim=D,
                  rms_norm_eps=config.get("rms_norm_eps", 1e-6) * h / hidden_size)
    shapes = {n: torch.empty(shape(n, t), dtype=t.dtype, device="meta") for n, t in old.items()}
    return _write_folder(src, out, shapes, make, config,
                         {"from": str(src), "hidden_size": [h, hidden_size], "intermediate_size": [i, intermediate_size],
                          "heads": [[H, Hk], [num_heads, num_kv_heads]], "seed": seed}, shard_bytes)
