"""The engine's demo stage runs on the tiny trained model and reports real numbers."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from onecard.demo import DemoContext
from onecard.engine.demo_stage import demo_stage


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny decode-sized matmuls are slower with 2 threads on a loaded shared CPU; restore afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_demo_stage(tiny_model, tmp_path):
    with open(tmp_path / "log.txt", "w") as log:
        ctx = DemoContext(tmp_path, "cpu", Console(file=log), {"model_dir": tiny_model.path})
        res = demo_stage(ctx)
    assert res.ok and "tok/s" in res.summary and ctx.artifacts["engine_tok_s"] > 0
