"""GPU monitoring tied to what the LLM job is doing.

NVML sampler (``nvml``), torch allocator fragmentation (``allocator``), the
``Monitor`` API and JSONL trace (``monitor``, ``trace``), thermal guard
(``guard``), reports (``report``), live panel (``panel``), Prometheus
collectors (``prometheus``), HF Trainer callback (``callbacks``) and trace
replay (``replay``).
"""

from onecard.monitor.allocator import AllocatorStats, allocator_stats, memory_advice, stats_from_memory_stats
from onecard.monitor.guard import GuardPolicy, HalveSetting, PauseBackoff, PowerLimiter, ThermalGuard
from onecard.monitor.monitor import Monitor
from onecard.monitor.nvml import GPUSample, NvmlReader, decode_throttle, open_nvml, throttle_words
from onecard.monitor.trace import Trace, load_trace

__all__ = ["AllocatorStats", "GPUSample", "GuardPolicy", "HalveSetting", "Monitor", "NvmlReader", "PauseBackoff",
           "PowerLimiter", "ThermalGuard", "Trace", "allocator_stats", "decode_throttle", "load_trace",
           "memory_advice", "open_nvml", "stats_from_memory_stats", "throttle_words"]
