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
    """Match a user-typed or driver-reported name ('4090', 'NVIDIA H100 80GB HBM3', 'a100-40')."""
    wanted = _norm(name)
    specs = list_gpus()
    for spec in specs:
        if wanted in {_norm(spec.key), _norm(spec.name), *(_norm(a) for a in spec.aliases)}:
            return spec
    # Driver names carry suffixes ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"): longest alias contained wins.
    hits = [(len(_norm(a)), s) for s in specs for a in (s.key, s.name, *s.aliases) if _norm(a) and _norm(a) in wanted]
    if hits:
        return max(hits, key=lambda h: h[0])[1]
    known = ", ".join(s.key for s in specs)
    raise BadInputError(f"unknown GPU '{name}'; known cards: {known}")


COMPARE_FIELDS: tuple[tuple[str, str], ...] = (
    ("memory", "Memory"),
    ("bandwidth", "Bandwidth"),
    ("bf16_dense", "BF16/FP16 tensor, dense, FP32 acc."),
    ("bf16_sparse", "  same, 2:4 sparse"),
    ("fp16_acc16", "FP16 tensor, dense, FP16 acc."),
    ("fp8", "FP8 tensor cores"),
    ("power", "Power"),
    ("cc", "Compute capability"),
)


def compare_rows(specs: list[GPUSpec]) -> list[tuple[str, list[str]]]:
    """The seed article's §1.3 table, with each throughput's basis spelled out."""
    cells = {
        "memory": lambda s: f"{s.memory_gib:g} GiB {s.memory_type}",
        "bandwidth": lambda s: f"{s.bandwidth_gbs / 1000:.2f} TB/s",
        "bf16_dense": lambda s: f"{s.bf16_dense_tflops:g} TFLOP/s",
        "bf16_sparse": lambda s: f"{s.bf16_sparse_tflops:g} TFLOP/s",
        "fp16_acc16": lambda s: f"{s.fp16_acc16_dense_tflops:g} TFLOP/s",
        "fp8": lambda s: f"yes ({s.fp8_dense_tflops:g} dense)" if s.fp8 else "no",
        "power": lambda s: f"{s.power_w:g} W",
        "cc": lambda s: f"sm_{s.compute_capability.replace('.', '')} ({s.architecture})",
    }
    return [(label, [cells[field](s) for s in specs]) for field, label in COMPARE_FIELDS]
