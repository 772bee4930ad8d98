"""``onecard monitor``: panel (--once and live in a pseudo-terminal), run -- CMD, report."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from onecard.cli import app
from onecard.monitor.replay import synthetic_trace
from onecard.monitor.trace import load_trace

SRC = str(Path(__file__).resolve().parents[1] / "src")
runner = CliRunner()


def test_once_prints_one_frame():
    res = runner.invoke(app, ["monitor", "--once"])
    assert res.exit_code == 0, res.output
    assert "onecard monitor" in res.output
    from onecard.monitor.nvml import open_nvml

    reader, _ = open_nvml()
    if reader is None:
        assert "no GPU" in res.output and "NVML" in res.output
    else:
        reader.close()


def test_once_replay_shows_gpu_row_and_reasons(tmp_path):
    trace = synthetic_trace(tmp_path / "t.jsonl", seconds=5, temp=lambda t: 87.0, throttle=lambda t: 0x4 | 0x40)
    res = runner.invoke(app, ["monitor", "--once", "--replay", str(trace)], env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    assert "4090" in res.output and "87°C" in res.output
    assert "SW power cap" in res.output and "HW thermal" in res.output and "4242" in res.output


def test_json_sample(tmp_path):
    trace = synthetic_trace(tmp_path / "t.jsonl", seconds=2, throttle=lambda t: 0x40)
    res = runner.invoke(app, ["monitor", "--json", "--replay", str(trace)])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["kind"] == "sample" and d["gpus"][0]["reasons"] == ["hw_thermal"] and d["gpus"][0]["temp_c"] == 70.0
    res = runner.invoke(app, ["monitor", "--json"])
    assert res.exit_code == 0 and "gpus" in json.loads(res.output)


def test_run_wraps_command_and_report(tmp_path):
    log = tmp_path / "run.jsonl"
    child = ("from onecard.monitor import Monitor\n"
             "with Monitor() as m:\n"
             "    [m.record(tokens=32, step_time=0.01) for _ in range(4)]\n"
             "raise SystemExit(5)\n")
    res = runner.invoke(app, ["monitor", "run", "--log", str(log), "--interval", "0.1", "--report", str(tmp_path / "rep"),
                              "--", sys.executable, "-c", child], env={"PYTHONPATH": SRC})
    assert res.exit_code == 5, res.output  # the wrapped command's exit code is ours
    tr = load_trace(log)
    assert tr.exit_code == 5 and tr.meta["command"].startswith(sys.executable)
    assert [r["tokens"] for r in tr.records] == [32] * 4  # written by the child's own Monitor
    assert (tmp_path / "rep" / "monitor.json").is_file() and (tmp_path / "rep" / "monitor.png").is_file()
    res = runner.invoke(app, ["monitor", "report", str(log), "--out", str(tmp_path / "r2"), "--name", "x"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "r2" / "x.json").read_text())
    assert summary["tokens_total"] == 128 and summary["exit_code"] == 5
    assert "tokens_total" in res.output


def test_wrapped_command_form_without_run(tmp_path):
    log = tmp_path / "run.jsonl"
    res = runner.invoke(app, ["monitor", "--log", str(log), "--interval", "0.1", "--", sys.executable, "-c",
                              "raise SystemExit(3)"], env={"PYTHONPATH": SRC})
    assert res.exit_code == 3, res.output
    assert load_trace(log).exit_code == 3


def test_run_errors_are_one_line(tmp_path):
    res = runner.invoke(app, ["monitor", "run", "--log", str(tmp_path / "x.jsonl"), "--", "no-such-command-xyz"])
    assert res.exit_code != 0 and "cannot start 'no-such-command-xyz'" in str(res.exception)
    res = runner.invoke(app, ["monitor", "report", str(tmp_path / "nope.jsonl")])
    assert res.exit_code != 0 and "does not exist" in str(res.exception)


def _read_pty(cmd: list[str], seconds: float) -> tuple[str, int]:
    """Run ``cmd`` on a pseudo-terminal (so rich sees a real TTY and animates) and collect its output."""
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": SRC, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "40"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = b""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        r, _, _ = select.select([master], [], [], 0.2)
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    code = proc.wait(timeout=30)
    os.close(master)
    return out.decode(errors="replace"), code


def test_live_panel_renders_and_refreshes_in_a_pty(tmp_path):
    trace = synthetic_trace(tmp_path / "t.jsonl", seconds=30, temp=lambda t: 70.0 + t, throttle=lambda t: 0x20,
                            util=lambda t: (t * 37) % 100)
    out, code = _read_pty([sys.executable, "-m", "onecard.cli", "monitor", "--interval", "0.1", "--duration", "2.5",
                           "--replay", str(trace)], seconds=60)
    assert code == 0, out[-2000:]
    assert "4090" in out and "SW thermal" in out and "slowdown" in out
    assert "\x1b[" in out                          # a terminal UI, not plain text
    assert out.count("onecard monitor") >= 3       # several frames redrawn in place
    assert "▁" in out or "▂" in out or "▃" in out  # sparkline history


def test_demo_stage_reports_the_run(tmp_path):
    from rich.console import Console

    from onecard.demo import DemoContext
    from onecard.monitor.demo_stage import demo_stage, start_demo_monitor

    ctx = DemoContext(tmp_path, "cpu", Console())
    assert not demo_stage(ctx).ok  # not started: says so, never a fake report
    start = start_demo_monitor(ctx)
    assert start.ok and "monitor.jsonl" in start.summary
    ctx.artifacts["monitor"].record(tokens=10, step_time=0.1)
    time.sleep(0.6)
    res = demo_stage(ctx)
    assert res.ok and "samples over" in res.summary
    summary = json.loads(ctx.artifacts["monitor_report"].read_text())
    assert summary["records"] == 1 and summary["exit_code"] == 0 and summary["samples"] >= 2
    assert ctx.artifacts["monitor_png"].is_file()


def test_guarded_run_on_cpu_and_power_flag_needs_nvml(tmp_path):
    from onecard.monitor.nvml import open_nvml

    reader, _ = open_nvml()
    if reader is not None:
        reader.close()
        import pytest

        pytest.skip("this machine has NVML; the power path is tested with a fake writer")
    res = runner.invoke(app, ["monitor", "run", "--guard", "--log", str(tmp_path / "g.jsonl"), "--", sys.executable, "-c", "pass"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["monitor", "run", "--guard", "--allow-power-limit", "--log", str(tmp_path / "g.jsonl"),
                              "--", sys.executable, "-c", "pass"])
    assert res.exit_code != 0 and "--allow-power-limit needs NVML" in str(res.exception)
