"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's Triton kernels.

Why: a captured bs=1 decode step is some 260 small kernels back to back, and between two of them the GPU drains
one grid before it starts the next, a microsecond or so each time. With PDL a kernel lets the GPU schedule its
dependent grid early (``griddepcontrol.launch_dependents``) and the dependent waits for its prerequisite to
complete (``griddepcontrol.wait``) before it reads anything, so the next launch overlaps the previous tail.

What a kernel may load before its wait: whatever no kernel of the step writes (weights, the norms' weights, the
step's copied-in lengths, positions and block table), and, where the kernel before it is a GEMV, what a kernel
two or more launches back wrote (a norm's residual row): the GEMVs let the next kernel launch only after their
own wait, by which time the kernel before them had finished (cuBLAS and other PyTorch ops run without PDL, so
whatever follows them starts after they finish). So the decode GEMV loads its first weight tiles before the wait,
the add+norm kernels (which follow the o and down projections) their residual row and weight, and the decode
attention (after the qkv projection) the step's inputs; everything else waits first. A kernel launched without
the attribute passes the wait at once.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton.language as tl

    HAS_GDC = hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda, "gdc_launch_dependents")
except (ImportError, AttributeError):  # pragma: no cover - triton absent or too old
    tl = None
    HAS_GDC = False

_setting: bool | None = None  # None: on wherever the GPU and Triton support it


def set_programmatic_launch(on: bool | None) -> None:
    """Turn PDL on (True), off (False) or back to automatic (None) for kernels launched from now on; the engine
    sets it from ``EngineConfig.programmatic_launch`` before it captures its graphs."""
    global _setting
    _setting = on


@functools.cache
def _supported(device_index: int) -> bool:
    return HAS_GDC and torch.cuda.get_device_capability(device_index) >= (9, 0)


def use_pdl(x: torch.Tensor) -> bool:
    """Whether a kernel working on ``x`` is launched with PDL."""
    if not x.is_cuda or _setting is False:
        return False
    if not _supported(x.device.index if x.device.index is not None else torch.cuda.current_device()):
        if _setting:
            from onecard.errors import BadInputError

            raise BadInputError("programmatic_launch=True needs a Hopper-or-later GPU (compute capability 9.0+) and "
                                "a Triton with griddepcontrol (tl.extra.cuda.gdc_wait); leave it None")
        return False
    return True


def pdl_launch(x: torch.Tensor) -> dict:
    """The kernel arguments for ``x``'s device: ``PDL`` (the constexpr the kernel branches on) and, on CUDA with
    PDL, ``launch_pdl``."""
    on = use_pdl(x)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}


if tl is not None:
    import triton

    @triton.jit
    def let_next_start(PDL: tl.constexpr):
        """Let the next grid be scheduled (it still waits for this one to finish before it reads)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def wait_for_inputs(PDL: tl.constexpr):
        """Wait until the previous grid finished and its writes are visible; nothing it writes is read before."""
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def start_after_inputs(PDL: tl.constexpr):
        """First statement of a PDL-aware kernel: ``let_next_start`` then ``wait_for_inputs``."""
        let_next_start(PDL)
        wait_for_inputs(PDL)
