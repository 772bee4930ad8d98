"""Weight-only quantization: RTN, GPTQ and AWQ to int4 / int8, checkpoints other tools read, fast kernels.

- ``quantize_model_folder(model_dir, out_dir, QuantConfig(...))``: offline, layer by layer;
- ``load_quantized_model(folder, dtype, device)``: a GPTQ/AWQ folder into onecard's model;
- ``quantize_model_(model, "rtn-int4" | "int8" | "fp8")``: on-the-fly RTN of a loaded model;
- ``load_rtn_model(folder, "rtn-int4" | "int8", dtype, device)``: on-the-fly RTN while loading, one layer at a time;
- ``QuantLinear``: the module that runs the Triton int4/int8 kernels (``onecard.kernels.wo_matmul``);
- ``Fp8Linear``: fp8 weights and activations through ``torch._scaled_mm`` (``quantization="fp8"``).
"""

from onecard.quant.config import QuantConfig, QuantSpec
from onecard.quant.fp8 import Fp8Linear
from onecard.quant.layerwise import QuantReport, quantize_model_folder
from onecard.quant.linear import QuantLinear, use_tinygemm_
from onecard.quant.loader import load_quantized_hf, load_quantized_model, load_rtn_model, quantize_model_
from onecard.quant.rtn import QuantizedWeight, rtn_quantize

__all__ = ["Fp8Linear", "QuantConfig", "QuantLinear", "QuantReport", "QuantSpec", "QuantizedWeight", "load_quantized_hf",
           "load_quantized_model", "load_rtn_model", "quantize_model_", "quantize_model_folder", "rtn_quantize",
           "use_tinygemm_"]
