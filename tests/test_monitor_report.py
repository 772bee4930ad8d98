"""Report JSON + PNG from recorded traces (GPU with throttle periods, and a CPU-only run)."""

from __future__ import annotations

import json

import pytest

from onecard.errors import BadInputError
from onecard.monitor.report import summarize, write_report
from onecard.monitor.replay import synthetic_trace
from onecard.monitor.trace import load_trace


def _png_size(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(path).shape


def test_report_from_gpu_trace_with_throttle_periods(tmp_path):
    trace = synthetic_trace(tmp_path / "run.jsonl", seconds=100, interval=0.5,
                            temp=lambda t: 85.0 if 20 <= t < 50 else 70.0,
                            throttle=lambda t: 0x20 if 30 <= t < 50 else (0x4 if 70 <= t < 80 else 0),
                            tokens_per_s=lambda t: 800.0 if 30 <= t < 50 else 1200.0, exit_code=3)
    j, p = write_report(trace, tmp_path / "out", name="gpu_run")
    s = json.loads(j.read_text())
    assert s["gpu_count"] == 1 and s["gpu_names"] == ["NVIDIA GeForce RTX 4090"] and s["exit_code"] == 3
    assert s["duration_s"] == pytest.approx(100.0)
    assert s["gpu0_temp_max_c"] == 85.0 and s["gpu0_power_limit_w"] == 450.0
    assert s["gpu0_throttle_s_sw_thermal"] == pytest.approx(20.0)
    assert s["gpu0_throttle_s_sw_power_cap"] == pytest.approx(10.0)
    assert s["gpu0_slowdown_fraction"] == pytest.approx(0.30)
    assert s["gpu0_sm_clock_min_mhz"] == 2100.0
    # tokens: 800/s for 20 s and 1200/s for 79.5 s after the first record
    assert s["tokens_per_s"] == pytest.approx((800 * 20 + 1200 * 79.5) / 99.5, rel=1e-3)
    assert s["latency_p95"] == pytest.approx(0.026) and s["latency_p50"] == pytest.approx(0.02)
    h, w, _ = _png_size(p)
    assert h > 1000 and w > 800


def test_report_of_cpu_only_trace_has_no_gpu_rows(tmp_path):
    from onecard.monitor.monitor import Monitor
    from onecard.monitor.nvml import open_nvml

    if open_nvml()[0] is not None:
        pytest.skip("this machine has a GPU")
    log = tmp_path / "cpu.jsonl"
    with Monitor(interval=0.05, log=log) as mon:
        for _ in range(5):
            sum(range(200_000))
            mon.record(tokens=64, step_time=0.01)
    s = summarize(load_trace(log))
    assert s["gpu_count"] == 0 and "NVML" in s["no_gpu"] and s["records"] == 5 and s["tokens_total"] == 320
    assert s["proc_rss_peak_mib"] > 10
    j, p = write_report(log, tmp_path / "out")
    assert json.loads(j.read_text())["no_gpu"] and _png_size(p)[0] > 500


def test_bad_traces_are_clear_errors(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        load_trace(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "meta", "ts": 1}\nnot json\n')
    with pytest.raises(BadInputError, match=r"bad.jsonl:2 is not a onecard trace line"):
        load_trace(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"kind": "meta", "ts": 1}\n')
    with pytest.raises(BadInputError, match="no samples"):
        load_trace(empty)
