"""``onecard quantize``: quantize a model (GPTQ / AWQ / RTN, int4 / int8) into a new folder."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer


class Method(str, Enum):
    gptq = "gptq"
    awq = "awq"
    rtn = "rtn"
    fp8 = "fp8"


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    def quantize_cmd(
        model: str = typer.Argument(..., help="Local Hugging Face model folder (float weights)."),
        out: Path = typer.Option(..., "--out", help="New folder for the quantized model."),
        method: Method = typer.Option(Method.gptq, "--method", help="gptq, awq, rtn, or fp8 (e4m3 weights, a scale "
                                      "per channel: compressed-tensors, for fp8 GPUs)."),
        bits: int = typer.Option(None, "--bits", help="4 or 8 (default 4; fp8: 8)."),
        group_size: int = typer.Option(None, "--group-size", help="32, 64, 128, or -1 for per-channel (default 128; "
                                       "fp8: -1)."),
        act_order: bool = typer.Option(False, "--act-order/--no-act-order", help="GPTQ: quantize columns by decreasing Hessian diagonal."),
        sym: bool = typer.Option(True, "--sym/--asym", help="Symmetric or asymmetric (zero point) quantization; AWQ is always asymmetric."),
        calib: Path = typer.Option(None, "--calib", help="Calibration text file or folder (default: built-in local corpus)."),
        nsamples: int = typer.Option(128, "--nsamples", help="Calibration samples."),
        seqlen: int = typer.Option(2048, "--seqlen", help="Tokens per calibration sample."),
        damp: float = typer.Option(0.01, "--damp", help="GPTQ damping, fraction of the Hessian's mean diagonal."),
        seed: int = typer.Option(0, "--seed", help="Calibration sampling seed."),
        device: str = typer.Option(None, "--device", help="cuda or cpu (default: cuda if present)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
    ) -> None:
        """Quantize a model (GPTQ / AWQ / RTN, int4 / int8, or fp8) into a new folder, layer by layer."""
        from rich.console import Console

        from onecard.quant import QuantConfig, quantize_model_folder

        fp8 = method is Method.fp8
        bits = bits if bits is not None else (8 if fp8 else 4)
        group_size = group_size if group_size is not None else (-1 if fp8 else 128)
        cfg = QuantConfig(method=method.value, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                          damp_percent=damp, nsamples=nsamples, seqlen=seqlen, seed=seed, calib=calib)
        rep = quantize_model_folder(model, out, cfg, overwrite=overwrite, device=device)
        layout = {"awq": "AWQ GEMM", "fp8": "compressed-tensors fp8"}.get(rep.method, "GPTQ")
        Console().print(f"[green]wrote[/] {rep.out_dir} ({layout} layout, {rep.bits}-bit, group {rep.group_size}): "
                        f"{rep.quantized_bytes / 2**20:.1f} MiB of weights from {rep.source_bytes / 2**20:.1f} MiB, "
                        f"{rep.layers} layers in {rep.seconds:.1f} s")
