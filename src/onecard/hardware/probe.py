"""What this machine has: torch, CUDA, the GPU matched to the catalog, Triton, NVML, extras.

``probe()`` never raises: a missing driver or library is a finding, reported as
a ``Check`` with the consequence for the user, so ``onecard doctor`` exits 0 on
a CPU-only machine.
"""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import dataclass, field

from onecard.hardware.catalog import GIB, GPUSpec, find_gpu
from onecard.errors import BadInputError


@dataclass
class GPUInfo:
    index: int
    name: str
    total_gib: float
    free_gib: float
    compute_capability: str
    bf16: bool
    fp8: bool
    spec: GPUSpec | None


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class MachineReport:
    python: str
    torch: str
    cuda: str | None
    driver: str | None
    gpus: list[GPUInfo] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)


_EXTRAS = {
    "triton": ("kernels", "Triton kernels (paged attention, int4/int8 GEMM, fused training ops)"),
    "peft": ("train", "LoRA / QLoRA fine-tuning"),
    "fastapi": ("serve", "OpenAI-compatible HTTP server"),
    "uvicorn": ("serve", "OpenAI-compatible HTTP server"),
    "prometheus_client": ("serve", "Prometheus /metrics"),
    "matplotlib": ("monitor", "PNG reports and benchmark charts"),
    "sqlite_vec": ("rag", "vector search for RAG"),
    "apsw": ("rag", "SQLite with extension loading for RAG"),
    "pypdf": ("rag", "PDF loading for RAG"),
    "sentence_transformers": ("rag", "embeddings for RAG"),
}


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else v
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver / no NVML library: a finding, not an error
        return None


def _gpus(torch) -> list[GPUInfo]:
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        cc = f"{props.major}.{props.minor}"
        try:
            spec = find_gpu(props.name)
        except BadInputError:
            spec = None
        out.append(GPUInfo(i, props.name, total / GIB, free / GIB, cc, props.major >= 8,
                           (props.major, props.minor) >= (8, 9), spec))
    return out


def probe() -> MachineReport:
    import torch

    cuda_ok = torch.cuda.is_available()
    report = MachineReport(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda if cuda_ok else None,
        driver=_driver_version(),
        gpus=_gpus(torch) if cuda_ok else [],
    )
    c = report.checks.append
    if not cuda_ok:
        c(Check("GPU", False, "no CUDA GPU visible: onecard runs on CPU (tiny models, tests, demo); "
                "speed and 24 GB features need an NVIDIA GPU and a CUDA build of torch"))
    for g in report.gpus:
        known = f"catalog: {g.spec.key}" if g.spec else "not in the catalog (roofline figures unavailable)"
        c(Check(f"GPU {g.index}", True, f"{g.name}, {g.free_gib:.1f}/{g.total_gib:.1f} GiB free, sm_{g.compute_capability.replace('.', '')}, {known}"))
        c(Check(f"GPU {g.index} bf16", g.bf16, "bf16 supported" if g.bf16 else "no bf16 (pre-Ampere): use --dtype float16"))
        c(Check(f"GPU {g.index} fp8", g.fp8, "fp8 tensor cores (Ada/Hopper)" if g.fp8 else "no fp8 tensor cores: fp8 KV cache is stored, not computed, in fp8"))
    c(Check("NVML", report.driver is not None,
            f"driver {report.driver}" if report.driver else "NVML unavailable: monitor shows no GPU rows"))
    for module, (extra, what) in _EXTRAS.items():
        found = importlib.util.find_spec(module) is not None
        c(Check(module, found, f"{what}: available" if found else f"{what}: pip install 'onecard[{extra}]'"))
    return report
