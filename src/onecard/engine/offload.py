"""Weight offload: decoder layers that do not fit the card live in pinned CPU memory and stream in every forward.

``offload_layers(model, n, device)`` moves everything to ``device`` except
``n`` decoder layers (spread evenly through the stack, so their copies overlap
the resident layers' compute). Each offloaded layer's tensors (bf16 weights or
``QuantLinear``'s int4/int8 buffers, norms, biases) are packed into one pinned
host buffer; on the card there are ``min(2, n)`` staging slots of one layer
each. Offloaded layer k is bound *permanently* to slot ``k % slots`` (its
parameters are views into the slot), so ``models/llama.py`` runs unchanged and
no tensor is rebound per step. A forward pre-hook waits for the layer's copy;
the next offloaded layer's copy is issued on a side CUDA stream as soon as its
slot's previous user has finished (double buffering), and the last layer
prefetches the first for the next step. Events order every copy after the
compute that last read its slot, and every compute after its copy.

On CPU the same code runs with CPU-to-CPU copies and no streams or events, so
the tests exercise the whole path. Decode speed is bounded by the host link:
``expected_tok_s`` is the estimate ``onecard generate``/``serve`` log before
starting (offloaded bytes / measured host-to-device bandwidth + on-card bytes /
card bandwidth).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from onecard.errors import BadInputError, DoesNotFitError, UnsupportedModelError

log = logging.getLogger(__name__)
GiB = 1 << 30
ALIGN = 256  # byte alignment of each tensor inside a layer's flat buffer (every dtype view stays aligned)


def offloaded_indices(num_layers: int, n: int) -> list[int]:
    """``n`` of ``num_layers`` layer indices spread evenly (the middle of each of n equal spans)."""
    if not 0 <= n <= num_layers:
        raise BadInputError(f"offload_layers={n} must be in 0..{num_layers} (the model's decoder layers)")
    return [(2 * k + 1) * num_layers // (2 * n) for k in range(n)]


@dataclass(frozen=True)
class _Entry:
    """Where one tensor of a layer sits in the flat buffer, and how to put it back on its module."""

    module: str        # dotted path inside the layer ("" = the layer itself)
    name: str
    is_param: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def layer_layout(layer: nn.Module) -> tuple[list[_Entry], int]:
    """Every parameter and buffer of ``layer`` at an aligned offset in one flat byte buffer; (entries, total bytes)."""
    entries, offset = [], 0
    for mod_name, mod in layer.named_modules():
        tensors = [(n, t, True) for n, t in mod._parameters.items() if t is not None]
        tensors += [(n, t, False) for n, t in mod._buffers.items() if t is not None]
        for name, t, is_param in tensors:
            nbytes = t.numel() * t.element_size()
            entries.append(_Entry(mod_name, name, is_param, t.dtype, tuple(t.shape), offset, nbytes))
            offset += -(-nbytes // ALIGN) * ALIGN
    return entries, offset


def _views(flat: torch.Tensor, entries: list[_Entry]) -> list[torch.Tensor]:
    return [flat[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in entries]


def _bind(layer: nn.Module, entries: list[_Entry], views: list[torch.Tensor]) -> None:
    """Point the layer's parameters/buffers at ``views`` (the forward then reads them in place)."""
    for e, v in zip(entries, views):
        mod = layer.get_submodule(e.module)
        if e.is_param:
            mod._parameters[e.name] = nn.Parameter(v, requires_grad=False)
        else:
            mod._buffers[e.name] = v


class LayerStreamer:
    """Owns the pinned host copies and the staging slots; its hooks stream offloaded layers in during forward."""

    def __init__(self, layers: list[nn.Module], device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.entries, self.layer_bytes = layer_layout(layers[0])
        for layer in layers[1:]:
            if layer_layout(layer)[0] != self.entries:
                raise UnsupportedModelError("weight offload needs identical decoder layers (same tensors, shapes and "
                                            "dtypes); quantize every layer the same way or set offload_layers=0")
        self.host: list[torch.Tensor] = []
        self.num_slots = min(2, len(layers))
        self.slots = [torch.empty(self.layer_bytes, dtype=torch.uint8, device=device) for _ in range(self.num_slots)]
        for k, layer in enumerate(layers):  # one layer at a time: its old tensors are freed as it is rebound
            flat = torch.empty(self.layer_bytes, dtype=torch.uint8, pin_memory=self.is_cuda)
            for e, v in zip(self.entries, _views(flat, self.entries)):
                v.copy_(getattr(layer.get_submodule(e.module), e.name))
            self.host.append(flat)
            _bind(layer, self.entries, _views(self.slots[k % self.num_slots], self.entries))
        self.layers = layers
        self.slot_layer: list[int | None] = [None] * self.num_slots  # which layer a slot holds (or is receiving)
        if self.is_cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.copied = [torch.cuda.Event() for _ in range(self.num_slots)]
            self.computed = [torch.cuda.Event() for _ in range(self.num_slots)]
        self.handles = []
        for k, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(lambda mod, args, k=k: self._before(k)))
            self.handles.append(layer.register_forward_hook(lambda mod, args, out, k=k: self._after(k)))
        self._copy(0)  # the first step's first layer starts streaming now

    @property
    def offloaded_bytes(self) -> int:
        """Bytes that cross the host link per forward (one whole copy of every offloaded layer)."""
        return self.layer_bytes * len(self.layers)

    def _slot(self, k: int) -> int:
        return k % self.num_slots

    def _copy(self, k: int) -> None:
        """Start copying layer k into its slot, after the compute that last read that slot."""
        s = self._slot(k)
        if self.is_cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.computed[s])
                self.slots[s].copy_(self.host[k], non_blocking=True)
                self.copied[s].record(self.copy_stream)
        else:
            self.slots[s].copy_(self.host[k])
        self.slot_layer[s] = k

    def _before(self, k: int) -> None:
        s = self._slot(k)
        if self.slot_layer[s] != k:  # a forward was interrupted (exception) and left another layer here
            self._copy(k)
        if self.is_cuda:
            torch.cuda.current_stream(self.device).wait_event(self.copied[s])
        nxt = (k + 1) % len(self.layers)
        if self._slot(nxt) != s:
            self._copy(nxt)

    def _after(self, k: int) -> None:
        s = self._slot(k)
        if self.is_cuda:
            self.computed[s].record(torch.cuda.current_stream(self.device))
        nxt = (k + 1) % len(self.layers)
        if self._slot(nxt) == s:  # one slot (or the odd wrap-around): the next copy must wait for this compute
            self._copy(nxt)


@torch.no_grad()
def offload_layers(model: nn.Module, n: int, device: torch.device,
                   prepare_layer: Callable[[nn.Module], None] | None = None) -> LayerStreamer | None:
    """Move ``model`` (built on the CPU) to ``device`` with ``n`` decoder layers kept in host memory.

    ``prepare_layer(layer)`` runs on each decoder layer once it is on ``device`` and before it is placed (on-the-fly
    quantization done on the card, one dense layer at a time). Returns the streamer (kept alive on the model as
    ``model.offload``), or None when ``n`` is 0.
    """
    idx = set(offloaded_indices(len(model.layers), n))
    for name, child in model.named_children():
        if name != "layers":
            child.to(device)
    streamed = []
    for i, layer in enumerate(model.layers):
        if prepare_layer is not None:
            layer.to(device)
            prepare_layer(layer)
        if i in idx:
            layer.to("cpu")
            streamed.append(layer)
        else:
            layer.to(device)
    model.offload = LayerStreamer(streamed, device) if streamed else None
    return model.offload


def measure_h2d_bandwidth(device: torch.device, nbytes: int = 64 << 20, repeats: int = 3) -> float:
    """Pinned host-to-device copy bandwidth in GB/s (~50 ms on PCIe 4/5); on CPU, a host memcpy's."""
    is_cuda = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=is_cuda)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=is_cuda)  # warm-up
    if is_cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src, non_blocking=is_cuda)
    if is_cuda:
        torch.cuda.synchronize(device)
    return nbytes * repeats / (time.perf_counter() - t0) / 1e9


def expected_tok_s(offloaded_bytes: int, resident_bytes: int, h2d_gbs: float, device_gbs: float | None) -> float:
    """bs=1 decode estimate: every step streams ``offloaded_bytes`` over the host link and reads ``resident_bytes``
    on the card (the sum, i.e. no credit for overlap: the measured speed should land between this and the host-link
    bound ``h2d_gbs / offloaded_bytes``)."""
    t = offloaded_bytes / (h2d_gbs * 1e9) + (resident_bytes / (device_gbs * 1e9) if device_gbs else 0.0)
    return 1.0 / t


def resident_step_bytes(model: nn.Module) -> int:
    """Weight bytes a decode step reads on the card: every tensor outside the staging slots, minus the rope table and
    the (untied) embedding table, of which one row each is read."""
    streamer = getattr(model, "offload", None)
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen or (streamer is not None and _in_slots(t, streamer)):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    skip = [model.rotary.cos_sin] + ([] if model.args.tie_word_embeddings else [model.embed_tokens.weight])
    return total - sum(t.numel() * t.element_size() for t in skip)


def _in_slots(t: torch.Tensor, streamer: LayerStreamer) -> bool:
    return any(s.data_ptr() <= t.data_ptr() < s.data_ptr() + streamer.layer_bytes for s in streamer.slots)


def card_bandwidth_gbs(device: torch.device) -> float | None:
    """The live card's memory bandwidth from the catalog (None on CPU or for a card the catalog lacks)."""
    if device.type != "cuda":
        return None
    from onecard.hardware import find_gpu

    try:
        return find_gpu(torch.cuda.get_device_name(device)).bandwidth_gbs
    except BadInputError:
        return None


def describe_offload(model: nn.Module, device: torch.device) -> dict:
    """Offload facts and the expected bs=1 speed; measures the host-to-device bandwidth (~50 ms)."""
    streamer: LayerStreamer = model.offload
    h2d = measure_h2d_bandwidth(device)
    dev_bw = card_bandwidth_gbs(device)
    resident = resident_step_bytes(model)
    return {"offload_layers": len(streamer.layers), "num_layers": len(model.layers),
            "offloaded_gib": streamer.offloaded_bytes / GiB, "staging_gib": streamer.layer_bytes * streamer.num_slots / GiB,
            "h2d_gbs": h2d, "card_bandwidth_gbs": dev_bw, "resident_step_gib": resident / GiB,
            "pcie_bound_tok_s": h2d * 1e9 / streamer.offloaded_bytes,
            "expected_tok_s": expected_tok_s(streamer.offloaded_bytes, resident, h2d, dev_bw)}


def quantize_layer(quantize: Callable[[nn.Module, str], nn.Module], layer: nn.Module, spec: str) -> None:
    """On-the-fly quantization of one decoder layer (``quantize_model_`` finds linears under a ``layers.`` path)."""
    quantize(nn.ModuleDict({"layers": nn.ModuleList([layer])}), spec)


def plan_offload_layers(model_path, device: torch.device, config) -> int:
    """``offload_layers="auto"``: the planner's layer count for the live card under this process's memory cap.

    0 on CPU (the weights already live in host memory). The planner (``onecard.plan``) is imported here, at start-up
    only, because the count is its prediction; the engine does not depend on it otherwise.
    """
    if device.type != "cuda":
        return 0
    import dataclasses

    from onecard.plan import plan_inference, resolve_card

    card = resolve_card(None)
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory * torch.cuda.get_per_process_memory_fraction(index)
    card = dataclasses.replace(card, memory_gib=min(card.memory_gib, total / GiB))
    from onecard.quant import QuantSpec

    bits = QuantSpec.parse(config.quantization).bits if config.quantization else None
    plan = plan_inference(str(model_path), card, bits=bits, max_model_len=config.max_model_len, max_num_seqs=1,
                          kv_cache_dtype=config.kv_cache_dtype, gpu_memory_utilization=config.gpu_memory_utilization)
    if not plan.fits and not plan.offload_layers:
        raise DoesNotFitError(f"even with every decoder layer in CPU memory, the rest needs more than the "
                              f"{card.memory_gib:.1f} GiB cap; lower max_model_len or quantize (quantization='rtn-int4')")
    return 0 if plan.fits else plan.offload_layers
