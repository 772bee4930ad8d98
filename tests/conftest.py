"""Shared test setup: CPU-only by default, Triton in interpreter mode without CUDA, GPU tests skipped cleanly."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported so kernels run on the CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu-test.sh on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _release_gpu_memory(request):
    """An engine sizes its KV cache from the card's free memory: an engine a previous test left to the garbage
    collector (reference cycles) must not shrink the next test's card."""
    yield
    if torch.cuda.is_available() and "gpu" in request.keywords:
        import gc

        gc.collect()
        torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def tiny_model():
    """The project's own trained ~5M-param Llama (trained once, cached on disk)."""
    from onecard.testing import train_tiny_model

    return train_tiny_model()


@pytest.fixture(scope="session")
def random_checkpoint():
    """Factory: random-weight tiny checkpoint of a built-in architecture, cached per session."""
    from onecard.testing import make_random_checkpoint

    return lambda arch, size="tiny", dtype="float32": make_random_checkpoint(arch, size, dtype=dtype)


@pytest.fixture(scope="session")
def benchmark_script():
    """Factory: a script of ``benchmarks/`` (by file stem) loaded as a module, to test its pure helpers."""
    import importlib.util
    from pathlib import Path

    def load(stem: str):
        spec = importlib.util.spec_from_file_location(stem, Path(__file__).parents[1] / "benchmarks" / f"{stem}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny decode-sized matmuls are slower with 2 threads on a busy 2-core CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
