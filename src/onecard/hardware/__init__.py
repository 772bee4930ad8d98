"""GPU catalog (a data table with sources) and the live-machine probe."""

from onecard.hardware.catalog import GPUSpec, compare_rows, find_gpu, list_gpus
from onecard.hardware.probe import MachineReport, probe

__all__ = ["GPUSpec", "MachineReport", "compare_rows", "find_gpu", "list_gpus", "probe"]
