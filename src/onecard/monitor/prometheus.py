"""Prometheus collectors with names modelled on dcgm-exporter's (``DCGM_FI_DEV_GPU_TEMP`` ->
``onecard_gpu_temp``, ``DCGM_FI_DEV_FB_USED`` -> ``onecard_fb_used``...), same units (°C, W, MiB,
MHz, %) and labels (``gpu``, ``UUID``, ``device``, ``modelName``), so dcgm dashboards need only a prefix change.

``register_gpu_metrics(registry, monitor=...)`` adds them to any
``CollectorRegistry`` - the server's ``/metrics`` uses it - and reads the
monitor's latest sample at scrape time (no extra NVML calls); with a bare
``reader`` it reads NVML on each scrape instead.
"""

from __future__ import annotations

from typing import Any, Iterator

from onecard.errors import require_extra
from onecard.monitor.nvml import THROTTLE_REASONS, GPUSample
from onecard.monitor.trace import Sample

# name -> (GPUSample attribute or callable, help). Units follow dcgm-exporter.
GPU_METRICS: dict[str, tuple[Any, str]] = {
    "onecard_gpu_temp": ("temp_c", "GPU temperature (in C)."),
    "onecard_memory_temp": ("mem_temp_c", "Memory temperature (in C)."),
    "onecard_power_usage": ("power_w", "Power draw (in W)."),
    "onecard_power_mgmt_limit": ("power_limit_w", "Enforced power limit (in W)."),
    "onecard_gpu_utilization": ("util_gpu", "GPU utilization (in %)."),
    "onecard_mem_copy_utilization": ("util_mem", "Memory utilization (in %)."),
    "onecard_fb_used": ("mem_used_mib", "Framebuffer memory used (in MiB)."),
    "onecard_fb_free": (lambda g: None if g.mem_total_mib is None or g.mem_used_mib is None
                        else g.mem_total_mib - g.mem_used_mib, "Framebuffer memory free (in MiB)."),
    "onecard_fb_total": ("mem_total_mib", "Framebuffer memory total (in MiB)."),
    "onecard_sm_clock": ("sm_clock_mhz", "SM clock frequency (in MHz)."),
    "onecard_mem_clock": ("mem_clock_mhz", "Memory clock frequency (in MHz)."),
    "onecard_fan_speed": ("fan_pct", "Fan speed (in %)."),
    "onecard_clock_throttle_reasons": ("throttle", "Current clock throttle (event) reasons, NVML bitmask."),
    "onecard_pcie_tx_throughput": ("pcie_tx_kbs", "PCIe TX throughput (in KB/s)."),
    "onecard_pcie_rx_throughput": ("pcie_rx_kbs", "PCIe RX throughput (in KB/s)."),
}
ALLOC_METRICS: dict[str, tuple[str, str]] = {
    "onecard_torch_allocated_bytes": ("allocated", "Bytes in live tensors (this process's torch allocator)."),
    "onecard_torch_reserved_bytes": ("reserved", "Bytes reserved from the driver by the torch allocator."),
    "onecard_torch_inactive_split_bytes": ("inactive_split", "Free bytes in split segments that still hold live tensors."),
    "onecard_torch_fragmentation_ratio": ("fragmentation", "1 - allocated/reserved."),
    "onecard_torch_alloc_retries": ("num_alloc_retries", "cudaMalloc retries after freeing the cache."),
    "onecard_torch_ooms": ("num_ooms", "Out-of-memory errors raised by the allocator."),
}


def _value(g: GPUSample, how: Any) -> float | None:
    v = how(g) if callable(how) else getattr(g, how)
    return None if v is None else float(v)


class GPUCollector:
    """A prometheus-client custom collector; fresh values on every scrape."""

    def __init__(self, monitor: Any = None, reader: Any = None) -> None:
        if (monitor is None) == (reader is None):
            from onecard.errors import BadInputError

            raise BadInputError("GPUCollector needs exactly one of monitor= (a running Monitor) or reader= (an NvmlReader)")
        self.monitor, self.reader = monitor, reader

    def _sample(self) -> Sample | None:
        if self.monitor is not None:
            return self.monitor.latest()
        import time

        return Sample(ts=time.time(), gpus=self.reader.read())

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        s = self._sample()
        gpus = s.gpus if s else []
        count = GaugeMetricFamily("onecard_gpu_count", "GPUs visible to the monitor (0 on CPU machines).")
        count.add_metric([], float(len(gpus)))
        yield count
        labels = ["gpu", "UUID", "device", "modelName"]
        for name, (how, help_) in GPU_METRICS.items():
            fam = GaugeMetricFamily(name, help_, labels=labels)
            for g in gpus:
                v = _value(g, how)
                if v is not None:  # a refused reading is absent, as dcgm-exporter does, not a fake 0
                    fam.add_metric([str(g.index), g.uuid or "", f"nvidia{g.index}", g.name], v)
            yield fam
        reason = GaugeMetricFamily("onecard_clock_throttle_reason", "1 if this clock throttle (event) reason is active.",
                                   labels=labels + ["reason"])
        for g in gpus:
            if g.throttle is not None:
                for key, (bit, _, _) in THROTTLE_REASONS.items():
                    reason.add_metric([str(g.index), g.uuid or "", f"nvidia{g.index}", g.name, key],
                                      1.0 if g.throttle & bit else 0.0)
        yield reason
        a = s.allocator if s else None
        if a is not None:
            d = a.to_dict()
            for name, (key, help_) in ALLOC_METRICS.items():
                fam = GaugeMetricFamily(name, help_)
                fam.add_metric([], float(d[key]))
                yield fam


def register_gpu_metrics(registry: Any, monitor: Any = None, reader: Any = None) -> GPUCollector:
    """Register the GPU (and allocator) gauges on ``registry``; returns the collector (for ``unregister``)."""
    require_extra("prometheus_client", "monitor")
    c = GPUCollector(monitor=monitor, reader=reader)
    registry.register(c)
    return c


def exposition(registry: Any) -> str:
    """The text format a ``/metrics`` endpoint serves."""
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()
