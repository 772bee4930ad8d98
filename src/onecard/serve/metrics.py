"""Prometheus metrics for the server: request counts, latencies, tokens, engine load, KV cache, GPU.

GPU memory, temperature, power, clocks and throttle reasons come from
``onecard.monitor.prometheus`` (dcgm-exporter names with an ``onecard_``
prefix) whenever NVML is present. Each app gets its own ``CollectorRegistry`` (tests and benchmarks build many
apps in one process). Engine gauges and GPU gauges are read at scrape time by
custom collectors, so ``/metrics`` always shows the engine's current state -
in particular ``onecard_kv_cache_blocks_used`` going back to zero after an
aborted stream is how leaks are detected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

from onecard.serve.engine_info import engine_options

log = logging.getLogger(__name__)

# Latency buckets in seconds: TTFT spans a CPU tiny model (ms) to a long prefill on a 4090 (s).
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


class _EngineCollector:
    """Engine state (running/waiting sequences, KV blocks) read from ``engine.stats()`` at scrape time, and its
    options as ``onecard_engine_info{kv_cache_dtype=..., speculative_method=..., ...} 1``."""

    def __init__(self, get_engine: Callable[[], object | None]) -> None:
        self.get_engine = get_engine

    def collect(self):
        engine = self.get_engine()
        ready = GaugeMetricFamily("onecard_engine_ready", "1 once the engine has loaded and accepts requests")
        ready.add_metric([], float(bool(engine is not None and getattr(engine, "ready", False))))
        yield ready
        if engine is None or not getattr(engine, "ready", False):
            return
        options = engine_options(engine)
        if options:
            yield InfoMetricFamily("onecard_engine", "The engine's active options (kv dtype, speculation, offload, ...)",
                                   value={k: "" if v is None else str(v) for k, v in options.items()})
        stats = engine.stats()
        for key, name, doc in (
            ("num_running", "onecard_num_requests_running", "Sequence groups in the running batch"),
            ("num_waiting", "onecard_num_requests_waiting", "Sequence groups waiting to be scheduled"),
            ("kv_blocks_total", "onecard_kv_cache_blocks_total", "KV-cache blocks the engine allocated"),
            ("kv_blocks_used", "onecard_kv_cache_blocks_used", "KV-cache blocks holding live sequences"),
            ("kv_usage", "onecard_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0-1)"),
        ):
            if key in stats and stats[key] is not None:
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], float(stats[key]))
                yield g


def _register_gpu_collectors(registry: CollectorRegistry) -> str:
    """Attach the monitor's dcgm-style GPU gauges when NVML works; returns why not otherwise ("" when attached)."""
    from onecard.monitor.nvml import open_nvml
    from onecard.monitor.prometheus import register_gpu_metrics

    reader, why = open_nvml(pcie=False)  # PCIe counters cost ~40 ms per scrape inside the driver
    if reader is None:
        log.info("no GPU metrics on /metrics: %s", why)
        return why
    register_gpu_metrics(registry, reader=reader)
    return ""


class ServerMetrics:
    """All metrics of one server; the request handlers call the ``observe_*`` methods."""

    def __init__(self, get_engine: Callable[[], object | None], gpu: bool = True) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("onecard_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.aborted = Counter("onecard_requests_aborted", "Generation requests aborted, by reason",
                               ["reason"], registry=r)
        self.prompt_tokens = Counter("onecard_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("onecard_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("onecard_time_to_first_token_seconds", "Request arrival to first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("onecard_inter_token_latency_seconds", "Time between successive generated tokens",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("onecard_e2e_request_latency_seconds", "Request arrival to last token",
                             buckets=E2E_BUCKETS, registry=r)
        r.register(_EngineCollector(get_engine))
        self.gpu_missing = _register_gpu_collectors(r) if gpu else "GPU metrics disabled"

    def render(self) -> bytes:
        return generate_latest(self.registry)
