"""On a real GPU (skipped on CPU): NVML readings, allocator stats from live tensors, report. Reads only - never sets."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu


def test_real_gpu_trace_with_allocator_and_report(tmp_path):
    import torch

    from onecard.monitor.monitor import Monitor
    from onecard.monitor.nvml import open_nvml
    from onecard.monitor.report import write_report
    from onecard.monitor.trace import load_trace

    reader, why = open_nvml()
    assert reader is not None, why
    reader.close()
    # cached-but-free memory: free one of three blocks, so reserved > allocated
    blocks = [torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda") for _ in range(3)]
    del blocks[1]
    log = tmp_path / "gpu.jsonl"
    with Monitor(interval=0.1, log=log) as mon:
        y = torch.randn(4096, 4096, device="cuda")
        for _ in range(200):
            y = torch.tanh(y @ y)
            mon.record(tokens=4096)
        torch.cuda.synchronize()
    tr = load_trace(log)
    g = tr.samples[-1].gpus[0]
    assert g.mem_total_mib > 1000 and g.mem_used_mib > 500
    assert g.temp_c is not None and g.power_w is not None and g.sm_clock_mhz is not None and g.throttle is not None
    assert max(x.util_gpu for s in tr.samples for x in s.gpus if x.util_gpu is not None) > 0
    a = [s.allocator for s in tr.samples if s.allocator][-1]
    assert a.reserved >= a.allocated >= 512 * 2**20 and 0 <= a.fragmentation < 1
    j, p = write_report(tr, tmp_path / "out")
    assert j.is_file() and p.is_file()
