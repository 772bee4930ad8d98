"""Gradient checkpointing, optionally with the checkpoints offloaded to CPU memory.

Plain checkpointing keeps one hidden-state tensor per layer on the GPU
(seq x hidden x 2 bytes: 0.75 GiB per layer at 96k tokens for Llama-3-8B, 24 GiB
for its 32 layers). Offloaded checkpointing copies each layer's input to pinned
CPU memory during forward and brings it back for that layer's recomputation in
backward, so GPU activation memory is one layer's worth regardless of depth.

``_OffloadedCheckpoint`` is a reentrant-style autograd Function: it records the
autocast state so the recomputation runs in the same precision, and it does not
replay RNG state, so it refuses to run modules in training mode with dropout
(``check_no_dropout``); LoRA dropout 0 is onecard's default.

Both kinds run the recomputation with ``recomputing()`` true. A recomputed
layer's *output* is never read (backward needs only the tensors saved inside
the layer), so the layer's last matmul can skip producing it
(``lora.last_linear``): one of the seven matmuls of a Llama layer, a quarter of
its recomputation's FLOPs.
"""

from __future__ import annotations

import contextvars

import torch
from torch import nn

from onecard.errors import BadInputError

_RECOMPUTING = contextvars.ContextVar("onecard_recomputing", default=False)


def recomputing() -> bool:
    """Whether the code running is a checkpointed layer's recomputation, whose outputs backward never reads."""
    return _RECOMPUTING.get()


def as_recomputation(function, *args):
    """``function(*args)`` with ``recomputing()`` true: its caller reads no output of it, only the gradients."""
    token = _RECOMPUTING.set(True)
    try:
        return function(*args)
    finally:
        _RECOMPUTING.reset(token)


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run_function, hidden: torch.Tensor, *args):
        ctx.run_function = run_function
        ctx.args = args
        ctx.device = hidden.device
        ctx.autocast = autocast_states()
        pinned = hidden.is_cuda
        ctx.saved_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device="cpu", pin_memory=pinned)
        ctx.saved_hidden.copy_(hidden.detach(), non_blocking=pinned)
        with torch.no_grad():
            return run_function(hidden, *args)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden = ctx.saved_hidden.to(ctx.device, non_blocking=True).requires_grad_(True)
        ctx.saved_hidden = None
        with torch.enable_grad(), autocast_as(ctx.autocast):
            out = as_recomputation(ctx.run_function, hidden, *ctx.args)
        torch.autograd.backward(out, grad_out)
        return (None, hidden.grad) + (None,) * len(ctx.args)


def autocast_states() -> list[tuple[str, bool, torch.dtype]]:
    """The autocast state of every device type, for a backward that reruns forward code (``autocast_as``)."""
    return [(dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) for dev in ("cuda", "cpu")]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes ``x`` in here: autocast's where it is on for x's device, else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class autocast_as:
    """Re-enter the forward pass's autocast state for every device type."""

    def __init__(self, states) -> None:
        self.ctxs = [torch.autocast(device_type=dev, dtype=dt, enabled=on) for dev, on, dt in states]

    def __enter__(self):
        for c in self.ctxs:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.ctxs):
            c.__exit__(*exc)


def marked_checkpoint(function, *args, **kwargs):
    """torch's non-reentrant checkpoint (as HF calls it) whose recomputation runs with ``recomputing()`` true."""
    if kwargs:
        function = _bind(function, kwargs)
    calls = 0

    def run(*a):
        nonlocal calls
        calls += 1
        return function(*a) if calls == 1 else as_recomputation(function, *a)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def offloaded_checkpoint(function, hidden: torch.Tensor, *args, **kwargs):
    """Drop-in for ``torch.utils.checkpoint.checkpoint`` as HF calls it: ``(partial(layer.forward, **kw), hidden)``."""
    if kwargs:
        function = _bind(function, kwargs)
    return _OffloadedCheckpoint.apply(function, hidden, *args)


def _bind(function, kwargs):
    return lambda *a: function(*a, **kwargs)


def check_no_dropout(model: nn.Module) -> None:
    active = [n for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    if active:
        raise BadInputError(f"--offload-checkpoints needs dropout 0 (recomputation does not replay random masks), "
                            f"but {active[0]} has p>0; set --lora-dropout 0")


def enable_checkpointing(model: nn.Module, offload: bool = False) -> None:
    """Turn on HF gradient checkpointing for every decoder layer; with ``offload`` keep checkpoints on CPU."""
    model.config.use_cache = False
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # older transformers (e.g. 5.17, 4.x)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if offload:
        # reentrant-style: a layer's LoRA grads flow only if its input requires grad, even with a frozen embedding
        model.enable_input_require_grads()
    n = 0
    for m in model.modules():
        if hasattr(m, "_gradient_checkpointing_func") and getattr(m, "gradient_checkpointing", False):
            m._gradient_checkpointing_func = offloaded_checkpoint if offload else marked_checkpoint
            n += 1
    if n == 0:
        raise BadInputError(f"{type(model).__name__} has no checkpointable layers; "
                            + ("drop --offload-checkpoints" if offload else "train without gradient checkpointing"))
