"""NVML decoding and reading, against the real pynvml constants and a fake NVML module."""

from __future__ import annotations

import types

import pynvml
import pytest

from onecard.monitor.nvml import (THROTTLE_REASONS, NvmlReader, decode_throttle, open_nvml, slowdown_reasons,
                                  throttle_words)

# Every clock-event bit nvidia-ml-py defines, with the words the brief asks for.
PYNVML_BITS = {
    "nvmlClocksThrottleReasonGpuIdle": ("gpu_idle", "GPU idle"),
    "nvmlClocksThrottleReasonApplicationsClocksSetting": ("applications_clocks", "applications clocks setting"),
    "nvmlClocksThrottleReasonSwPowerCap": ("sw_power_cap", "SW power cap"),
    "nvmlClocksThrottleReasonHwSlowdown": ("hw_slowdown", "HW slowdown"),
    "nvmlClocksThrottleReasonSyncBoost": ("sync_boost", "sync boost"),
    "nvmlClocksThrottleReasonSwThermalSlowdown": ("sw_thermal", "SW thermal slowdown"),
    "nvmlClocksThrottleReasonHwThermalSlowdown": ("hw_thermal", "HW thermal slowdown"),
    "nvmlClocksThrottleReasonHwPowerBrakeSlowdown": ("hw_power_brake", "HW power brake slowdown"),
    "nvmlClocksThrottleReasonDisplayClockSetting": ("display_clocks", "display clock setting"),
}


@pytest.mark.parametrize("const", sorted(PYNVML_BITS))
def test_every_nvml_bit_decodes_to_its_words(const):
    key, words = PYNVML_BITS[const]
    bit = getattr(pynvml, const)
    assert decode_throttle(bit) == [key]
    assert throttle_words(bit) == [words]


def test_table_covers_every_bit_pynvml_defines():
    defined = {getattr(pynvml, n) for n in dir(pynvml)
               if n.startswith("nvmlClocksThrottleReason") and n not in ("nvmlClocksThrottleReasonAll", "nvmlClocksThrottleReasonNone")}
    assert defined == {bit for bit, _, _ in THROTTLE_REASONS.values()}
    assert decode_throttle(pynvml.nvmlClocksThrottleReasonAll) == list(THROTTLE_REASONS)


def test_combined_unknown_and_empty_masks():
    mask = pynvml.nvmlClocksThrottleReasonSwPowerCap | pynvml.nvmlClocksThrottleReasonHwThermalSlowdown | 0x8000
    assert decode_throttle(mask) == ["sw_power_cap", "hw_thermal", "unknown_0x8000"]
    assert throttle_words(mask)[-1] == "unknown 0x8000"
    assert decode_throttle(0) == [] and decode_throttle(None) == []
    # idle and settings are not slowdowns; power / thermal / HW are
    assert slowdown_reasons(0x1 | 0x2 | 0x10 | 0x100) == []
    assert slowdown_reasons(0x4 | 0x8 | 0x20 | 0x40 | 0x80) == ["sw_power_cap", "hw_slowdown", "sw_thermal", "hw_thermal", "hw_power_brake"]


class FakeNVML(types.SimpleNamespace):
    """Just enough of pynvml: one RTX 4090 whose fan and PCIe counters are 'not supported'."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM, NVML_CLOCK_MEM = pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_MEM
    NVML_PCIE_UTIL_TX_BYTES, NVML_PCIE_UTIL_RX_BYTES = pynvml.NVML_PCIE_UTIL_TX_BYTES, pynvml.NVML_PCIE_UTIL_RX_BYTES
    NVML_FI_DEV_MEMORY_TEMP = pynvml.NVML_FI_DEV_MEMORY_TEMP

    def __init__(self):
        super().__init__(calls=[], shut=False)

    def _ns(self, name):
        self.calls.append(name)
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlInit(self): pass
    def nvmlShutdown(self): self.shut = True
    def nvmlDeviceGetCount(self): return 1
    def nvmlDeviceGetHandleByIndex(self, i): return f"h{i}"
    def nvmlDeviceGetName(self, h): return b"NVIDIA GeForce RTX 4090"
    def nvmlDeviceGetUUID(self, h): return "GPU-1234"
    def nvmlDeviceGetUtilizationRates(self, h): return types.SimpleNamespace(gpu=97, memory=61)
    def nvmlDeviceGetMemoryInfo(self, h): return types.SimpleNamespace(used=20 * 2**30, total=24 * 2**30)
    def nvmlDeviceGetTemperature(self, h, s): return 81
    def nvmlDeviceGetFieldValues(self, h, ids):
        fv = pynvml.c_nvmlFieldValue_t()
        fv.nvmlReturn, fv.valueType, fv.value.uiVal = 0, 1, 90
        return [fv]
    def nvmlDeviceGetPowerUsage(self, h): return 431_500
    def nvmlDeviceGetEnforcedPowerLimit(self, h): return 450_000
    def nvmlDeviceGetClockInfo(self, h, c): return 2520 if c == pynvml.NVML_CLOCK_SM else 10501
    def nvmlDeviceGetFanSpeed(self, h): return self._ns("fan")
    def nvmlDeviceGetCurrentClocksEventReasons(self, h): return 0x4 | 0x20
    def nvmlDeviceGetPcieThroughput(self, h, c): return self._ns("pcie")
    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [types.SimpleNamespace(pid=77, usedGpuMemory=19 * 2**30), types.SimpleNamespace(pid=78, usedGpuMemory=None)]


def test_reader_fills_fields_and_leaves_refused_ones_none():
    fake = FakeNVML()
    r = NvmlReader(fake)
    (g,) = r.read()
    assert (g.name, g.uuid, g.util_gpu, g.util_mem) == ("NVIDIA GeForce RTX 4090", "GPU-1234", 97.0, 61.0)
    assert (g.mem_used_mib, g.mem_total_mib) == (20 * 1024, 24 * 1024)
    assert (g.temp_c, g.mem_temp_c, g.power_w, g.power_limit_w) == (81.0, 90.0, 431.5, 450.0)
    assert (g.sm_clock_mhz, g.mem_clock_mhz) == (2520.0, 10501.0)
    assert g.fan_pct is None and g.pcie_tx_kbs is None and g.pcie_rx_kbs is None  # not supported -> None, not 0
    assert g.reasons == ["sw_power_cap", "sw_thermal"] and g.slowdowns == ["sw_power_cap", "sw_thermal"]
    assert g.processes == [{"pid": 77, "used_mib": 19 * 1024}, {"pid": 78, "used_mib": None}]
    r.read()  # a refused query is not retried every sample
    assert fake.calls.count("fan") == 1 and fake.calls.count("pcie") == 1
    r.close()
    assert fake.shut


def test_reader_rejects_missing_gpu_index():
    from onecard.errors import BadInputError

    with pytest.raises(BadInputError, match="GPU index 3 does not exist"):
        NvmlReader(FakeNVML(), indices=[3])


def test_open_nvml_on_this_machine_gives_reader_or_reason():
    reader, why = open_nvml()
    if reader is None:
        assert why  # CPU machine: a reason, not an exception
    else:
        assert reader.read()
        reader.close()
