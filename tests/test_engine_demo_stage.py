"""The engine's demo stage runs on the tiny trained model and reports real numbers."""

from __future__ import annotations

import pytest
from rich.console import Console

from onecard.demo import DemoContext
from onecard.engine.demo_stage import demo_stage


pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_stage(tiny_model, tmp_path):
    with open(tmp_path / "log.txt", "w") as log:
        ctx = DemoContext(tmp_path, "cpu", Console(file=log), {"model_dir": tiny_model.path})
        res = demo_stage(ctx)
    assert res.ok and "tok/s" in res.summary and ctx.artifacts["engine_tok_s"] > 0
