"""NVML readings per GPU (via nvidia-ml-py, imported as ``pynvml``) and the clock-reason decoder.

Every reading is optional: consumer cards, MIG slices, containers and old
drivers each refuse some NVML queries (``NOT_SUPPORTED`` / ``NO_PERMISSION``).
A refused field is ``None`` in the sample, never a made-up zero, so reports
and the panel can say "n/a" instead of plotting a false flat line.

``read_gpus`` takes the NVML module as an argument so tests can pass a fake
one; nothing in this file changes any GPU setting (see ``guard.py`` for the
only writer, which is off by default).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# Clock event ("throttle") reason bits, as in nvml.h / pynvml
# (nvmlClocksEventReason* == nvmlClocksThrottleReason*). Key -> (bit, words, kind).
# kind: "idle"/"setting" are not slowdowns; "power", "thermal", "hw" are.
THROTTLE_REASONS: dict[str, tuple[int, str, str]] = {
    "gpu_idle": (0x1, "GPU idle", "idle"),
    "applications_clocks": (0x2, "applications clocks setting", "setting"),
    "sw_power_cap": (0x4, "SW power cap", "power"),
    "hw_slowdown": (0x8, "HW slowdown", "hw"),
    "sync_boost": (0x10, "sync boost", "setting"),
    "sw_thermal": (0x20, "SW thermal slowdown", "thermal"),
    "hw_thermal": (0x40, "HW thermal slowdown", "thermal"),
    "hw_power_brake": (0x80, "HW power brake slowdown", "power"),
    "display_clocks": (0x100, "display clock setting", "setting"),
    "board_limit": (0x200, "board limit", "power"),
    "reliability": (0x400, "reliability (voltage) limit", "hw"),
}
SLOWDOWN_KINDS = frozenset({"power", "thermal", "hw"})
_KNOWN_MASK = sum(bit for bit, _, _ in THROTTLE_REASONS.values())


def decode_throttle(mask: int | None) -> list[str]:
    """Reason keys set in an NVML clock-event bitmask; unknown bits become ``"unknown_0x..."``.

    ``None`` (the driver did not report) decodes to ``[]``; a zero mask means
    the clocks run free.
    """
    if not mask:
        return []
    keys = [k for k, (bit, _, _) in THROTTLE_REASONS.items() if mask & bit]
    rest = mask & ~_KNOWN_MASK
    if rest:
        keys.append(f"unknown_{rest:#x}")
    return keys


def throttle_words(mask: int | None) -> list[str]:
    """Human words for a mask, e.g. ``["SW power cap", "HW thermal slowdown"]``."""
    return [THROTTLE_REASONS[k][1] if k in THROTTLE_REASONS else k.replace("_", " ") for k in decode_throttle(mask)]


def slowdown_reasons(mask: int | None) -> list[str]:
    """Only the reasons that actually slow the work (power, thermal, hardware), not idle or settings."""
    return [k for k in decode_throttle(mask) if k in THROTTLE_REASONS and THROTTLE_REASONS[k][2] in SLOWDOWN_KINDS]


@dataclass
class GPUSample:
    """One GPU at one instant; ``None`` = not reported by this driver/card."""

    index: int
    name: str
    uuid: str | None = None
    util_gpu: float | None = None        # % of time a kernel ran (NVML "GPU utilization", dcgm GPU_UTIL)
    util_mem: float | None = None        # % of time memory was read/written (dcgm MEM_COPY_UTIL)
    mem_used_mib: float | None = None
    mem_total_mib: float | None = None
    temp_c: float | None = None
    mem_temp_c: float | None = None      # HBM cards report it; GDDR consumer cards usually not
    power_w: float | None = None
    power_limit_w: float | None = None   # enforced limit
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    fan_pct: float | None = None
    throttle: int | None = None          # raw clock-event reason bitmask
    pcie_tx_kbs: float | None = None
    pcie_rx_kbs: float | None = None
    processes: list[dict[str, Any]] = field(default_factory=list)  # [{"pid", "used_mib"}]

    @property
    def reasons(self) -> list[str]:
        return decode_throttle(self.throttle)

    @property
    def slowdowns(self) -> list[str]:
        return slowdown_reasons(self.throttle)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reasons"] = self.reasons
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPUSample":
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in d.items() if k in names})


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _field_number(fv: Any) -> float | None:
    """Value of one ``nvmlFieldValue_t`` by its declared type, or None if NVML refused it."""
    if getattr(fv, "nvmlReturn", 1) != 0:
        return None
    attr = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal"}.get(fv.valueType)
    return float(getattr(fv.value, attr)) if attr else None


class NvmlReader:
    """Reads all GPUs through an NVML module (real ``pynvml`` or a test fake).

    Handles are looked up once; each ``read()`` costs about a dozen NVML calls
    per GPU (plus ~2x20 ms inside the driver for PCIe counters, which NVML
    measures over a 20 ms window; ``pcie=False`` skips them). ctypes releases
    the GIL during those calls, so a background sampler does not stall the job.
    """

    def __init__(self, nvml: Any = None, indices: list[int] | None = None, pcie: bool = True,
                 processes: bool = True) -> None:
        if nvml is None:
            import pynvml as nvml  # nvidia-ml-py (the old 'pynvml' package is a different, stale project)
        self.nvml = nvml
        self._refused: set[str] = set()
        nvml.nvmlInit()
        count = nvml.nvmlDeviceGetCount()
        self.indices = list(range(count)) if indices is None else list(indices)
        bad = [i for i in self.indices if not 0 <= i < count]
        if bad:
            from onecard.errors import BadInputError

            nvml.nvmlShutdown()
            raise BadInputError(f"GPU index {bad[0]} does not exist: this machine has {count} GPU(s) (0..{count - 1})")
        self.handles = {i: nvml.nvmlDeviceGetHandleByIndex(i) for i in self.indices}
        self.names = {i: _str(nvml.nvmlDeviceGetName(h)) for i, h in self.handles.items()}
        self.uuids = {i: self._try(nvml.nvmlDeviceGetUUID, h) for i, h in self.handles.items()}
        self.uuids = {i: _str(u) if u is not None else None for i, u in self.uuids.items()}
        self.pcie = pcie
        self.processes = processes

    def _try(self, fn: Any, *args: Any) -> Any:
        """Call NVML; a refused query (not supported, no permission, ...) gives None, logged once."""
        name = getattr(fn, "__name__", str(fn))
        if name in self._refused:
            return None
        try:
            return fn(*args)
        except self.nvml.NVMLError as err:
            log.debug("NVML %s refused: %s", name, err)
            self._refused.add(name)
            return None

    def _throttle(self, h: Any) -> int | None:
        n = self.nvml
        fn = getattr(n, "nvmlDeviceGetCurrentClocksEventReasons", None) or n.nvmlDeviceGetCurrentClocksThrottleReasons
        v = self._try(fn, h)
        return int(v) if v is not None else None

    def read_one(self, i: int) -> GPUSample:
        n, h = self.nvml, self.handles[i]
        s = GPUSample(index=i, name=self.names[i], uuid=self.uuids[i])
        util = self._try(n.nvmlDeviceGetUtilizationRates, h)
        if util is not None:
            s.util_gpu, s.util_mem = float(util.gpu), float(util.memory)
        mem = self._try(n.nvmlDeviceGetMemoryInfo, h)
        if mem is not None:
            s.mem_used_mib, s.mem_total_mib = mem.used / 2**20, mem.total / 2**20
        t = self._try(n.nvmlDeviceGetTemperature, h, n.NVML_TEMPERATURE_GPU)
        s.temp_c = float(t) if t is not None else None
        fv = self._try(n.nvmlDeviceGetFieldValues, h, [n.NVML_FI_DEV_MEMORY_TEMP])
        s.mem_temp_c = _field_number(fv[0]) if fv is not None else None
        p = self._try(n.nvmlDeviceGetPowerUsage, h)
        s.power_w = p / 1000.0 if p is not None else None
        pl = self._try(n.nvmlDeviceGetEnforcedPowerLimit, h)
        s.power_limit_w = pl / 1000.0 if pl is not None else None
        c = self._try(n.nvmlDeviceGetClockInfo, h, n.NVML_CLOCK_SM)
        s.sm_clock_mhz = float(c) if c is not None else None
        c = self._try(n.nvmlDeviceGetClockInfo, h, n.NVML_CLOCK_MEM)
        s.mem_clock_mhz = float(c) if c is not None else None
        f = self._try(n.nvmlDeviceGetFanSpeed, h)  # data-centre cards have no fan: None
        s.fan_pct = float(f) if f is not None else None
        s.throttle = self._throttle(h)
        if self.pcie:
            tx = self._try(n.nvmlDeviceGetPcieThroughput, h, n.NVML_PCIE_UTIL_TX_BYTES)
            rx = self._try(n.nvmlDeviceGetPcieThroughput, h, n.NVML_PCIE_UTIL_RX_BYTES)
            s.pcie_tx_kbs = float(tx) if tx is not None else None
            s.pcie_rx_kbs = float(rx) if rx is not None else None
        if self.processes:
            procs = self._try(n.nvmlDeviceGetComputeRunningProcesses, h) or []
            s.processes = [{"pid": int(p.pid),
                            "used_mib": p.usedGpuMemory / 2**20 if p.usedGpuMemory is not None else None}
                           for p in procs]
        return s

    def read(self) -> list[GPUSample]:
        return [self.read_one(i) for i in self.indices]

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:  # already shut down
            pass


def open_nvml(indices: list[int] | None = None, pcie: bool = True) -> tuple[NvmlReader | None, str]:
    """An ``NvmlReader`` for this machine, or ``(None, why)`` when there is no usable NVML (CPU machines)."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        reader = NvmlReader(pynvml, indices=indices, pcie=pcie)
    except pynvml.NVMLError as err:
        return None, f"NVML unavailable ({err}): no NVIDIA driver on this machine"
    if not reader.indices:
        reader.close()
        return None, "NVML found no GPU"
    return reader, ""
