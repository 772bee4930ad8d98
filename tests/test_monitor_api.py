"""Monitor: background sampling thread, record(), JSONL trace, child mode, Prometheus exposition."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry

from onecard.errors import BadInputError
from onecard.monitor.allocator import GIB, stats_from_memory_stats
from onecard.monitor.monitor import TRACE_ENV, Monitor
from onecard.monitor.nvml import GPUSample
from onecard.monitor.prometheus import GPU_METRICS, exposition, register_gpu_metrics
from onecard.monitor.replay import ReplayReader, synthetic_trace
from onecard.monitor.trace import load_trace


class CountingReader:
    def __init__(self):
        self.reads = 0
        self.closed = False

    def read(self):
        self.reads += 1
        return [GPUSample(index=0, name="Fake GPU", uuid="GPU-f", temp_c=60.0 + self.reads, throttle=0x4,
                          mem_used_mib=100.0, mem_total_mib=1000.0)]

    def close(self):
        self.closed = True


def test_background_sampling_and_records(tmp_path):
    log = tmp_path / "m.jsonl"
    reader = CountingReader()
    with Monitor(interval=0.02, log=log, reader=reader) as mon:
        end = time.monotonic() + 10  # a loaded CI machine may starve the thread for a while
        while reader.reads < 6 and time.monotonic() < end:
            time.sleep(0.02)
        mon.record(tokens=10, latency=0.5, ttft=0.1, batch_size=4, kv_use=0.3)
    assert reader.reads >= 5 and reader.closed
    with pytest.raises(BadInputError, match="create a new Monitor"):
        mon.start()
    tr = load_trace(log)
    assert tr.meta["gpus"] == ["Fake GPU"] and len(tr.samples) >= 5
    assert tr.samples[-1].gpus[0].reasons == ["sw_power_cap"]
    assert tr.records[0]["ttft"] == 0.1 and tr.records[0]["kv_use"] == 0.3
    s = mon.summary()
    assert s["gpu0_temp_max_c"] >= 65 and s["ttft_mean"] == 0.1 and s["sampler_cost_mean_ms"] is not None


def test_record_and_interval_validation():
    with pytest.raises(BadInputError, match="interval"):
        Monitor(interval=0, reader=CountingReader())
    mon = Monitor(reader=CountingReader())
    with pytest.raises(BadInputError, match="finite numbers"):
        mon.record(tokens="many")
    with pytest.raises(BadInputError, match="finite numbers"):
        mon.record(latency=float("nan"))
    with pytest.raises(BadInputError, match="at least one metric"):
        mon.record()


def test_child_monitor_appends_records_to_parent_trace(tmp_path, monkeypatch):
    log = tmp_path / "parent.jsonl"
    parent = Monitor(interval=10, log=log, reader=CountingReader(), attach=False)
    parent.start()
    monkeypatch.setenv(TRACE_ENV, str(log))
    child = Monitor(interval=10)
    assert child.child and child.reader is None
    with child:
        child.record(tokens=5)
    parent.record(tokens=7)
    parent.stop(exit_code=0)
    tr = load_trace(log)
    assert [r["tokens"] for r in tr.records] == [5, 7] and tr.exit_code == 0
    assert tr.meta["child"] is False  # the child did not overwrite the run's meta line


def test_prometheus_exposition_has_dcgm_style_names(tmp_path):
    trace = synthetic_trace(tmp_path / "t.jsonl", seconds=5, throttle=lambda t: 0x4 | 0x40)
    mon = Monitor(reader=ReplayReader(trace), attach=False)
    s = mon.sample_now()
    s.allocator = stats_from_memory_stats({"allocated_bytes.all.current": 3 * GIB, "reserved_bytes.all.current": 4 * GIB})
    reg = CollectorRegistry()
    register_gpu_metrics(reg, monitor=mon)
    text = exposition(reg)
    for name in GPU_METRICS:
        if name != "onecard_memory_temp":  # this card does not report memory temperature: absent, not 0
            assert f"\n{name}{{" in text, name
    assert "onecard_memory_temp{" not in text
    assert 'onecard_gpu_temp{UUID="GPU-synthetic-0",device="nvidia0",gpu="0",modelName="NVIDIA GeForce RTX 4090"} 70.0' in text
    assert "onecard_clock_throttle_reasons{" in text and '} 68.0' in text  # 0x4 | 0x40
    assert 'reason="hw_thermal"} 1.0' in text and 'reason="gpu_idle"} 0.0' in text
    assert "onecard_torch_fragmentation_ratio 0.25" in text
    assert "onecard_gpu_count 1.0" in text


def test_prometheus_no_gpu():
    class NoGPU:
        def read(self):
            return []

        def close(self):
            pass

    reg = CollectorRegistry()
    register_gpu_metrics(reg, reader=NoGPU())
    text = exposition(reg)
    assert "onecard_gpu_count 0.0" in text and "# TYPE onecard_gpu_temp gauge" in text
    with pytest.raises(BadInputError):
        register_gpu_metrics(CollectorRegistry())
