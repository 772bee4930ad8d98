"""The GPU catalog: figures live in ``gpus.json`` with their basis and source.

Code never hard-codes a card's figure; the planner, benchmarks (roofline %) and
``onecard hardware compare`` all read this table.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources

from onecard.errors import BadInputError

GIB = 1024**3


@dataclass(frozen=True)
class GPUSpec:
    key: str
    name: str
    aliases: tuple[str, ...]
    architecture: str
    compute_capability: str
    memory_gib: float
    memory_type: str
    bandwidth_gbs: float
    bf16_dense_tflops: float
    bf16_sparse_tflops: float
    fp16_acc16_dense_tflops: float
    fp8: bool
    fp8_dense_tflops: float | None
    power_w: float
    host_link_gbs: float
    source: str

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    @property
    def bf16_supported(self) -> bool:
        return float(self.compute_capability) >= 8.0

    def as_dict(self) -> dict:
        return asdict(self)


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("nvidia", "").replace("geforce", ""))


@lru_cache(maxsize=1)
def _load() -> tuple[dict, tuple[GPUSpec, ...]]:
    raw = json.loads(resources.files("onecard.hardware").joinpath("gpus.json").read_text())
    specs = tuple(GPUSpec(**{**g, "aliases": tuple(g["aliases"])}) for g in raw["gpus"])
    return raw["_basis"], specs


def basis() -> dict[str, str]:
    """What each numeric column means (dense/sparse, accumulate type)."""
    return dict(_load()[0])


def list_gpus() -> tuple[GPUSpec, ...]:
    return _load()[1]


def find_gpu(name: str) -> GPUSpec:
    """Match a user-typed or driver-reported name ('4090', 'NVIDIA H100 80GB HBM3', 'a100-40').

    Matching is exact after normalisation (case, spaces, dashes, 'NVIDIA', 'GeForce'
    ignored): a loose substring match would file an 'H100 NVL' under the H100 SXM or
    an 'RTX 4090 D' under the 4090, and then every roofline figure would be wrong.
    """
    wanted = _norm(name)
    for spec in list_gpus():
        if wanted in {_norm(spec.key), _norm(spec.name), *(_norm(a) for a in spec.aliases)}:
            return spec
    known = ", ".join(s.key for s in list_gpus())
    raise BadInputError(f"unknown GPU '{name}'; known cards: {known} (onecard hardware list shows them)")


COMPARE_FIELDS: tuple[tuple[str, str], ...] = (
    ("memory", "Memory GiB"),
    ("memory_type", "Memory type"),
    ("bandwidth", "Bandwidth GB/s"),
    ("bf16_dense", "BF16 dense TF"),
    ("bf16_sparse", "BF16 2:4 sparse TF"),
    ("fp16_acc16", "FP16 acc16 TF"),
    ("fp8", "FP8 dense TF"),
    ("power", "Power W"),
    ("cc", "Compute cap."),
)
# Printed under the table: what "TF" means, so the short labels stay honest.
COMPARE_NOTE = ("TF = tensor-core TFLOP/s, dense, FP32 accumulate unless noted; 2:4 sparse = structured "
                "sparsity (2x dense); acc16 = FP16 accumulate (GeForce runs it at 2x); FP8 'no' = no FP8 tensor cores")


def compare_rows(specs: list[GPUSpec]) -> list[tuple[str, list[str]]]:
    """The seed article's §1.3 table with correct figures; short labels so it fits 80 columns (see COMPARE_NOTE)."""
    cells = {
        "memory": lambda s: f"{s.memory_gib:g}",
        "memory_type": lambda s: s.memory_type,
        "bandwidth": lambda s: f"{s.bandwidth_gbs:g}",
        "bf16_dense": lambda s: f"{s.bf16_dense_tflops:g}",
        "bf16_sparse": lambda s: f"{s.bf16_sparse_tflops:g}",
        "fp16_acc16": lambda s: f"{s.fp16_acc16_dense_tflops:g}",
        "fp8": lambda s: f"{s.fp8_dense_tflops:g}" if s.fp8 else "no",
        "power": lambda s: f"{s.power_w:g}",
        "cc": lambda s: f"sm_{s.compute_capability.replace('.', '')}",
    }
    return [(label, [cells[field](s) for s in specs]) for field, label in COMPARE_FIELDS]
