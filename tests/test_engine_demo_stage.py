"""The engine's demo stage runs on the tiny trained model and reports real numbers."""

from __future__ import annotations

from rich.console import Console

from onecard.demo import DemoContext
from onecard.engine.demo_stage import demo_stage


def test_demo_stage(tiny_model, tmp_path):
    ctx = DemoContext(tmp_path, "cpu", Console(file=open(tmp_path / "log.txt", "w")), {"model_dir": tiny_model.path})
    res = demo_stage(ctx)
    assert res.ok and "tok/s" in res.summary and "engine" in ctx.artifacts
