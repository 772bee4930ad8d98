"""What to quantize and how: ``QuantConfig`` (offline GPTQ/AWQ/RTN) and ``QuantSpec`` (on-the-fly RTN)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from onecard.errors import BadInputError
from onecard.quant.rtn import check_bits_group

METHODS = ("gptq", "awq", "rtn", "fp8")


@dataclass(frozen=True)
class QuantConfig:
    """One quantization run. Validated on construction; every bad value is a one-line ``BadInputError``.

    ``act_order`` (GPTQ's desc_act) quantizes input channels in order of
    decreasing Hessian diagonal; ``damp_percent`` is added to the Hessian
    diagonal (fraction of its mean) so the Cholesky factorization exists.
    AWQ is asymmetric 4-bit by definition (its GEMM layout).
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    damp_percent: float = 0.01
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    calib: Path | None = None  # text file or folder of .txt/.md/.py; None = built-in local corpus
    block_size: int = 128      # GPTQ lazy-batch width

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise BadInputError(f"--method {self.method!r} is not supported; use one of {', '.join(METHODS)}")
        if self.method != "fp8":
            check_bits_group(self.bits, self.group_size)
        if self.method == "fp8" and (self.bits != 8 or self.group_size != -1 or self.act_order):
            raise BadInputError("fp8 stores e4m3 weights with one scale per output channel: use --bits 8 "
                                "--group-size -1 (the defaults for --method fp8), no --act-order")
        if self.method == "awq" and self.bits != 4:
            raise BadInputError("AWQ writes the 4-bit AWQ GEMM layout; use --bits 4 (or --method gptq/rtn for 8-bit)")
        if self.method == "awq" and self.group_size == -1:
            raise BadInputError("AWQ needs a group size (32, 64 or 128)")
        if self.act_order and self.method != "gptq":
            raise BadInputError("--act-order applies to GPTQ only")
        if not 0 < self.damp_percent < 1:
            raise BadInputError(f"--damp {self.damp_percent} must be in (0, 1); 0.01 is the usual value")
        if self.nsamples < 1 or self.seqlen < 16:
            raise BadInputError(f"calibration needs --nsamples >= 1 and --seqlen >= 16 (got {self.nsamples} x {self.seqlen})")
        if self.group_size != -1 and self.block_size % self.group_size:
            raise BadInputError(f"block_size {self.block_size} must be a multiple of the group size {self.group_size}")

    @property
    def needs_calibration(self) -> bool:
        return self.method not in ("rtn", "fp8")

    @property
    def effective_sym(self) -> bool:
        return False if self.method == "awq" else self.sym


@dataclass(frozen=True)
class QuantSpec:
    """On-the-fly RTN for the engine: ``"rtn-int4"`` (4-bit, group 128, asymmetric), ``"int8"`` (per-channel,
    symmetric, weight-only) or ``"fp8"`` (e4m3 weights per channel and activations per token: ``Fp8Linear``).

    Also accepts ``"rtn-int4-g64"`` / ``"rtn-int4-g32"``; ``"rtn-int8"`` is ``"int8"``.
    """

    bits: int
    group_size: int
    sym: bool
    float8: bool = False

    @classmethod
    def parse(cls, spec: "str | QuantSpec") -> "QuantSpec":
        if isinstance(spec, QuantSpec):
            return spec
        s = spec.strip().lower()
        if s in ("int8", "rtn-int8"):
            return cls(8, -1, True)
        if s in ("fp8", "fp8-e4m3"):
            return cls(8, -1, True, float8=True)
        if s in ("rtn-int4", "int4"):
            return cls(4, 128, False)
        if s.startswith("rtn-int4-g") and s[10:].isdigit():
            g = int(s[10:])
            check_bits_group(4, g)
            return cls(4, g, False)
        raise BadInputError(f"quantization {spec!r} is not supported; use 'rtn-int4', 'rtn-int4-g64', 'int8' or "
                            "'fp8', or pass a folder made by `onecard quantize`")
