"""Kernel timing shared by the kernel microbenchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def kernel_timer(device: str) -> Callable[[Callable[[], object]], float]:
    """Median microseconds of ``fn()``: on CUDA, timed inside a CUDA graph (``graph_time_us``), a few wall-clock
    runs in the CPU interpreter (smoke only)."""
    if device == "cuda":
        return graph_time_us

    def cpu(fn) -> float:
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)

    return cpu


def graph_time_us(fn: Callable[[], object], calls: int = 20, replays: int = 7, flush_mib: int = 256) -> float:
    """Microseconds per ``fn()`` as a captured decode step runs it: from a CUDA graph, L2 flushed before each call.

    Why a graph: a decode kernel reads a few MiB in a few microseconds, less
    than its Python launch takes, so launch-by-launch timing (``do_bench``)
    measures the host, not the kernel. The engine replays graphs, so that is
    the cost that counts; it includes the kernel's own launch gap and every
    small kernel ``fn`` adds (memsets, casts). The flush (a memset larger than
    L2) makes the weights come from HBM, as in a model; a graph of flushes
    alone is timed too and subtracted.
    """
    import torch

    flush = torch.empty(flush_mib << 20, dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, autotunes) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)

    def capture(with_fn: bool) -> torch.cuda.CUDAGraph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                flush.zero_()
                if with_fn:
                    fn()
        return g

    def median_ms(g: torch.cuda.CUDAGraph) -> float:
        g.replay()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    both, flushes = capture(True), capture(False)
    return max(median_ms(both) - median_ms(flushes), 0.0) * 1e3 / calls
