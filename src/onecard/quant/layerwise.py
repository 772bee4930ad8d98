"""Quantize a model folder layer by layer: stream one decoder layer's weights, calibrate, quantize, move on.

Memory: one decoder layer in the working dtype plus the calibration
activations (``nsamples x seqlen x hidden``, twice) live on the device; the
quantized weights collect on the host (about a quarter of the model's size at
4-bit). So a 13B-arch model quantizes within a 24 GiB card and host RAM of
about the model's size plus a few GiB.

The per-layer forward uses transformers' own decoder-layer module for the
architecture (built on the meta device, then materialized one layer at a time),
so calibration activations are exactly what the HF model computes. Inputs
propagate layer to layer through the *quantized* layer (GPTQ, RTN) or the
rescaled float layer (AWQ, as AutoAWQ does).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from onecard.errors import BadInputError
from onecard.kernels.fp8_quant import quantize_rows_reference
from onecard.models.folder import ModelFolder, open_model_folder
from onecard.quant import awq as awq_mod
from onecard.quant.calibration import calibration_tokens
from onecard.quant.checkpoint import check_out_dir, quantization_config, write_checkpoint
from onecard.quant.config import QuantConfig
from onecard.quant.gptq import HessianAccumulator, gptq_quantize
from onecard.quant.packing import to_awq, to_gptq
from onecard.quant.rtn import QuantizedWeight, rtn_quantize, split_rows

log = logging.getLogger(__name__)

# HF module names inside a decoder layer, in true-sequential order: linears that share an input go together.
SEQUENTIAL = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


@dataclass(frozen=True)
class QuantReport:
    out_dir: Path
    method: str
    bits: int
    group_size: int
    layers: int
    seconds: float
    source_bytes: int
    quantized_bytes: int
    gptq_loss: float | None = None


class _HFLayers:
    """transformers' decoder layers for ``folder``'s config, materialized one at a time from the safetensors."""

    def __init__(self, folder: ModelFolder, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = {k: v for k, v in folder.config.items() if k != "quantization_config"}
        self.hf_config = AutoConfig.for_model(**cfg)
        self.hf_config._attn_implementation = "sdpa"
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(self.hf_config)
        self.folder, self.device, self.dtype = folder, device, dtype
        rotary = self.skeleton.model.rotary_emb
        with torch.device("cpu"):  # real buffers (the skeleton's are on meta)
            self.rotary = type(rotary)(config=self.hf_config).to(device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        (_, w), = self.folder.iter_tensors({"model.embed_tokens.weight"})
        return F.embedding(ids, w.to(self.dtype)).to(self.device)

    def layer(self, i: int) -> torch.nn.Module:
        prefix = f"model.layers.{i}."
        layer = self.skeleton.model.layers[i].to_empty(device=self.device)
        state = {n[len(prefix):]: t for n, t in self.folder.iter_tensors({n for n in self.folder.tensors if n.startswith(prefix)})}
        layer.load_state_dict({k: v.to(self.dtype) for k, v in state.items()}, strict=True)
        return layer.to(self.dtype).eval()

    def release(self, i: int) -> None:
        self.skeleton.model.layers[i].to("meta")

    def position_embeddings(self, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(seqlen, device=self.device).unsqueeze(0)
        probe = torch.zeros(1, seqlen, 1, device=self.device, dtype=self.dtype)
        return self.rotary(probe, pos)


def _run_layer(layer, xs: torch.Tensor, pe, batch: int = 1) -> torch.Tensor:
    outs = torch.empty_like(xs)
    pos = torch.arange(xs.shape[1], device=xs.device).unsqueeze(0)
    for b in range(0, xs.shape[0], batch):
        outs[b:b + batch] = layer(xs[b:b + batch], attention_mask=None, position_ids=pos, position_embeddings=pe)
    return outs


def _capture_inputs(layer, names: tuple[str, ...], xs: torch.Tensor, pe, consume) -> None:
    """Run the layer over all samples, calling ``consume(name, input)`` with each named linear's input."""
    hooks = [layer.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: consume(n, a[0])) for n in names]
    try:
        _run_layer(layer, xs, pe)
    finally:
        for h in hooks:
            h.remove()


def _set_weight(layer, name: str, w: torch.Tensor) -> None:
    lin = layer.get_submodule(name)
    lin.weight.data.copy_(w.to(lin.weight.dtype))


def _quantize_layer_gptq_rtn(layer, xs, pe, cfg: QuantConfig) -> tuple[dict[str, QuantizedWeight], float]:
    out: dict[str, QuantizedWeight] = {}
    loss_total = 0.0
    for names in SEQUENTIAL:
        if cfg.method == "gptq":
            acc = HessianAccumulator(layer.get_submodule(names[0]).in_features, xs.device)
            _capture_inputs(layer, names[:1], xs, pe, lambda n, x: acc.add(x))  # one Hessian per shared input
        # Linears sharing an input share H: quantize them as one stacked weight (rows are independent in
        # GPTQ, and act-order's permutation depends on H only), then split the rows back.
        ws = [layer.get_submodule(n).weight.data for n in names]
        w = torch.cat(ws, 0) if len(ws) > 1 else ws[0]
        if cfg.method == "gptq":
            qw, loss = gptq_quantize(w, acc.H, cfg.bits, cfg.group_size, cfg.sym, cfg.act_order,
                                     cfg.damp_percent, cfg.block_size)
            loss_total += loss
        else:
            qw = rtn_quantize(w, cfg.bits, cfg.group_size, cfg.sym)
        start = 0
        for n, wn in zip(names, ws):
            part = split_rows(qw, start, wn.shape[0])
            start += wn.shape[0]
            _set_weight(layer, n, part.dequantize())
            out[n] = part
    return out, loss_total


def _quantize_layer_awq(layer, xs, pe, cfg: QuantConfig, max_tokens: int = 8192) -> dict[str, QuantizedWeight]:
    feats: dict[str, list[torch.Tensor]] = {}
    firsts = tuple(names[0] for names in SEQUENTIAL)
    stride = max(1, xs.shape[0] * xs.shape[1] // max_tokens)
    whole = max(1, max_tokens // xs.shape[1])  # q/k/v are scored by attention: whole sequences, not every stride-th

    def keep(n: str, x: torch.Tensor) -> None:
        if n == "self_attn.q_proj":
            if len(feats.get(n, ())) < whole:
                feats.setdefault(n, []).append(x.reshape(-1, x.shape[-1]).float())
            return
        feats.setdefault(n, []).append(x.reshape(-1, x.shape[-1])[::stride].float())

    _capture_inputs(layer, firsts, xs, pe, keep)
    x = {n: torch.cat(v, 0) for n, v in feats.items()}
    W = {n: layer.get_submodule(n).weight.data.float().clone() for group in SEQUENTIAL for n in group}
    attn_norm, mlp_norm = layer.input_layernorm.weight.data, layer.post_attention_layernorm.weight.data

    def mlp_out(inp: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
        return (F.silu(inp @ ws[0].t()) * (inp @ ws[1].t())) @ W["mlp.down_proj"].t()

    attn = layer.self_attn
    shape = awq_mod.AttentionShape(
        attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim, pe[0][0], pe[1][0],
        tuple(getattr(attn, n).bias for n in ("q_proj", "k_proj", "v_proj")), W["self_attn.o_proj"])
    plan = [  # (linears, input key, op producing the input: norm weight or previous linear, score)
        (SEQUENTIAL[0], "self_attn.q_proj", ("norm", attn_norm), awq_mod.attention_outputs(shape)),
        (SEQUENTIAL[2], "mlp.gate_proj", ("norm", mlp_norm), mlp_out),
        (SEQUENTIAL[3], "mlp.down_proj", ("linear", "mlp.up_proj"), awq_mod.linear_outputs),
    ]
    if W["self_attn.v_proj"].shape == W["self_attn.o_proj"].shape:  # no GQA: v's rows feed o directly
        plan.insert(1, (SEQUENTIAL[1], "self_attn.o_proj", ("linear", "self_attn.v_proj"), awq_mod.linear_outputs))
    for names, key, (kind, prev), score in plan:
        group = awq_mod.ScaleGroup(key, [W[n] for n in names], score)
        s = awq_mod.search_scales(x[key], group, cfg.bits, cfg.group_size)
        for n in names:
            W[n].mul_(s)
        if kind == "norm":
            prev.div_(s.to(prev.dtype))
        else:
            W[prev].div_(s.unsqueeze(1))
            bias = layer.get_submodule(prev).bias  # Qwen2's v_proj: its bias is part of the rows being divided
            if bias is not None:
                bias.data.div_(s.to(bias.dtype))
        x[key] = x[key] / s
    out: dict[str, QuantizedWeight] = {}
    for names, key in zip(SEQUENTIAL, firsts):
        for n in names:
            if n not in ("self_attn.q_proj", "self_attn.k_proj"):  # AutoAWQ skips q/k: attention scores amplify clipping
                W[n] = awq_mod.clip_groups(W[n], awq_mod.search_clip(x[key], W[n], cfg.bits, cfg.group_size),
                                           cfg.group_size)
            out[n] = rtn_quantize(W[n], cfg.bits, cfg.group_size, sym=False)
            _set_weight(layer, n, W[n])  # the rescaled float layer propagates (as AutoAWQ does)
    return out


def _write_fp8_layer(layer, prefix: str, tensors: dict[str, torch.Tensor], save_dtype: torch.dtype) -> None:
    """A decoder layer in compressed-tensors fp8: each linear's e4m3 codes and ``[out, 1]`` channel scales (the
    arithmetic of ``quantization="fp8"``), everything else as stored."""
    linears = {n for names in SEQUENTIAL for n in names}
    for n, t in layer.state_dict().items():
        module = n.rsplit(".", 1)[0]
        if module in linears and n.endswith(".weight"):
            codes, scale = quantize_rows_reference(t.float())
            tensors[prefix + n] = codes.cpu()
            tensors[f"{prefix}{module}.weight_scale"] = scale.to("cpu", save_dtype)
        else:
            tensors[prefix + n] = t.to("cpu", save_dtype)


def _work_dtype(folder: ModelFolder, device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    stored = folder.weight_dtype()
    return torch.float16 if stored == "float16" else torch.bfloat16


def quantize_model_folder(model_dir: str | Path, out_dir: str | Path, cfg: QuantConfig, overwrite: bool = False,
                          device: str | None = None, progress: bool = True) -> QuantReport:
    """Quantize ``model_dir`` into ``out_dir`` (GPTQ layout for gptq/rtn, AWQ layout for awq, compressed-tensors
    fp8 for fp8)."""
    t0 = time.perf_counter()
    folder = open_model_folder(model_dir)
    if folder.quantization_config:
        qc = folder.quantization_config
        raise BadInputError(f"'{folder.path}' is already quantized ({qc.get('quant_method')} {qc.get('bits')}-bit); "
                            "quantize the original full-precision model")
    check_out_dir(Path(out_dir), folder.path, overwrite)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _work_dtype(folder, dev)
    args = folder.model_args()
    hf = _HFLayers(folder, dev, dtype)

    xs = pe = None
    if cfg.needs_calibration:
        ids = calibration_tokens(folder.load_tokenizer(), cfg.nsamples, cfg.seqlen, cfg.seed, cfg.calib)
        xs = hf.embed(ids)
        pe = hf.position_embeddings(cfg.seqlen)

    save_dtype = getattr(torch, folder.weight_dtype() or "float16")
    tensors: dict[str, torch.Tensor] = {}
    pack = to_awq if cfg.method == "awq" else to_gptq
    total_loss = 0.0
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       transient=False)
        task = bar.add_task(f"{cfg.method} {cfg.bits}-bit: layer", total=args.num_layers)
        bar.start()
    try:
        with torch.no_grad():
            for i in range(args.num_layers):
                layer = hf.layer(i)
                prefix = f"model.layers.{i}."
                if cfg.method == "fp8":
                    _write_fp8_layer(layer, prefix, tensors, save_dtype)
                else:
                    if cfg.method == "awq":
                        qws = _quantize_layer_awq(layer, xs, pe, cfg)
                    else:
                        qws, loss = _quantize_layer_gptq_rtn(layer, xs, pe, cfg)
                        total_loss += loss
                    if xs is not None:
                        xs = _run_layer(layer, xs, pe)
                    for n, qw in qws.items():
                        for suffix, t in pack(qw).items():
                            tensors[f"{prefix}{n}.{suffix}"] = t.cpu()
                    for n, t in layer.state_dict().items():  # norms (AWQ-rescaled), biases
                        if not (n.endswith(".weight") and n.rsplit(".", 1)[0] in qws):
                            tensors[prefix + n] = t.to("cpu", save_dtype)
                hf.release(i)
                del layer
                if bar:
                    bar.update(task, advance=1, description=f"{cfg.method} {cfg.bits}-bit: layer {i + 1}/{args.num_layers}")
    finally:
        if bar:
            bar.stop()
    for name, t in folder.iter_tensors({n for n in folder.tensors if not n.startswith("model.layers.")}):
        tensors[name] = t
    qconfig = quantization_config(cfg.method, cfg.bits, cfg.group_size, cfg.effective_sym, cfg.act_order,
                                  cfg.damp_percent)
    out = write_checkpoint(Path(out_dir), folder, tensors, qconfig, overwrite)
    src_bytes = sum(f.stat().st_size for f in folder.weight_files)
    q_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return QuantReport(out, cfg.method, cfg.bits, cfg.group_size, args.num_layers, time.perf_counter() - t0,
                       src_bytes, q_bytes, total_loss if cfg.method == "gptq" else None)
