"""Kernel timing shared by the kernel microbenchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def kernel_timer(device: str) -> Callable[[Callable[[], object]], float]:
    """Median microseconds of ``fn()``: Triton's do_bench on CUDA (L2 flushed between runs, so a kernel is timed
    reading from memory as it does in a model), a few wall-clock runs in the CPU interpreter (smoke only)."""
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median") * 1e3

    def cpu(fn) -> float:
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)

    return cpu
