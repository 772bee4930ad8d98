"""Full-size random models held in memory, int4 ones included, without a dense copy ever existing.

A 34B- or 70B-arch int4 model is what a 24 GB card is asked to hold, and its
bf16 checkpoint (68-140 GB) is more than a benchmark machine should write or
read just to throw the values away: random values do not change the work a
forward does. ``random_llama`` builds our ``LlamaModel`` on the CPU with every
decoder linear a ``QuantLinear`` of random codes, and ``in_memory_llm`` wraps
it in the engine (start-up profile, KV sizing, CUDA graphs) exactly as
``LLM(folder)`` would.
"""

from __future__ import annotations

import torch
from torch import nn

_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def random_llama(arch: str, size: str, bits: int | None, dtype: torch.dtype, max_positions: int,
                 group_size: int = 128, overrides: dict | None = None):
    """Our LlamaModel on the CPU with random weights; with ``bits``, every decoder linear is a QuantLinear holding
    random codes (one random template per shape, shared by the layers: each layer gets its own copy when the model
    moves to the GPU). ``overrides`` change config fields (a longer max_position_embeddings: RoPE runs at any length).
    Returns (model, its HF config dict)."""
    from onecard.models.arch import arch_config, scale_config
    from onecard.models.config import ModelArgs
    from onecard.models.llama import LlamaModel
    from onecard.quant import QuantLinear

    cfg = arch_config(arch) if size == "full" else scale_config(arch_config(arch), size)
    cfg.update(overrides or {})
    args = ModelArgs.from_hf_config(cfg)
    shapes = dict(zip(_LINEARS, args.fused_linear_shapes()))
    with torch.device("meta"):
        model = LlamaModel(args, max_positions)
    if bits:
        for layer in model.layers:
            for name in shapes:
                parent, attr = name.split(".")
                setattr(getattr(layer, parent), attr, nn.Identity())
    model = model.to_empty(device="cpu").to(dtype)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.init_table()
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.02, generator=g) if p.ndim > 1 else p.data.fill_(1.0)
    if bits:
        templates = {}
        for name, (k, n) in shapes.items():
            q = QuantLinear(k, n, bits, group_size)
            q.qweight.copy_(torch.randint(-2**31, 2**31 - 1, q.qweight.shape, generator=g, dtype=torch.int32))
            q.scales.fill_(0.02 / 2 ** (bits - 1))
            q.zeros.fill_(2 ** (bits - 1))
            templates[name] = q
        for layer in model.layers:
            for name, t in templates.items():
                parent, attr = name.split(".")
                q = QuantLinear(t.in_features, t.out_features, bits, group_size, device="meta")
                q.qweight, q.scales, q.zeros = t.qweight, t.scales, t.zeros
                setattr(getattr(layer, parent), attr, q)
    return model.eval().requires_grad_(False), cfg


def in_memory_llm(model, device: torch.device, max_model_len: int, *, offload: int = 0, max_num_seqs: int = 4,
                  enforce_eager: bool = False):
    """An ``LLM`` around an in-memory model: the engine's own start-up (profile, KV sizing) and decode path, with
    ``offload`` decoder layers kept in pinned CPU memory. Returns (llm, the offload streamer or None)."""
    from transformers import AutoTokenizer

    from onecard.engine import LLM
    from onecard.engine.config import EngineConfig
    from onecard.engine.llm_engine import LLMEngine
    from onecard.engine.model_runner import ModelRunner
    from onecard.engine.offload import offload_layers
    from onecard.testing.checkpoints import shared_tokenizer

    streamer = offload_layers(model, offload, device) if offload else None
    if not offload:
        model.to(device)
    cfg = EngineConfig("<in-memory>", max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_model_len, device=str(device),
                       enforce_eager=enforce_eager or bool(offload))
    cfg.resolve(model.args.max_position_embeddings)
    llm = object.__new__(LLM)  # LLM without a folder: same generate() over the same engine
    llm.config = cfg
    llm.tokenizer = AutoTokenizer.from_pretrained(str(shared_tokenizer(4096)))
    llm.engine = LLMEngine(cfg, ModelRunner(model, cfg, device), llm.tokenizer, set())
    return llm, streamer
