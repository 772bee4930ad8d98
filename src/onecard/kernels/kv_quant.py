"""KV-cache quantization: fp8 (e4m3) or int8 keys/values with one scale per (token, kv head).

Why per token and head: the scale is computed when the token's key/value is
written (absmax over head_dim / the format's largest value), so no calibration
pass and no running statistics are needed, a new token never re-scales old ones,
and an outlier token or head costs only its own precision. The scales live
beside the cache (``[num_blocks, block_size, kv_heads]`` fp16, 2 bytes next to
head_dim bytes: ~1.6% for head_dim=128), and the attention kernel multiplies
them in after the loads, so nothing is dequantized into memory.

Every writer (``store_kv`` here, the fused RoPE + store Triton kernel) follows
the same arithmetic, so the paths agree bit for bit where the hardware rounds
the same way:

    scale = fp16(max(absmax(x) / QMAX, MIN_SCALE))      x: the model-dtype value, read in fp32
    int8:  q = clamp(floor(x / scale + 0.5), -127, 127)
    fp8:   q = e4m3(clamp(x / scale, -448, 448))          round to nearest even
    x' = q * scale
"""

from __future__ import annotations

import torch

from onecard.errors import BadInputError

# name -> (storage dtype, largest magnitude the format stores); "auto" stores the model dtype, unscaled.
KV_QUANT_FORMATS: dict[str, tuple[torch.dtype, float]] = {
    "fp8": (torch.float8_e4m3fn, 448.0),
    "fp8_e4m3": (torch.float8_e4m3fn, 448.0),
    "int8": (torch.int8, 127.0),
}
KV_CACHE_DTYPES = ("auto", *KV_QUANT_FORMATS)
SCALE_DTYPE = torch.float16
# Smallest normal fp16: a head whose values are all below QMAX x 2^-14 (~0.008 for int8) is stored with this scale,
# so its absolute error stays below 2^-15 instead of the scale losing precision as an fp16 subnormal.
MIN_SCALE = 2.0 ** -14


def kv_storage(kv_cache_dtype: str, model_dtype: torch.dtype) -> tuple[torch.dtype, bool]:
    """(cache element dtype, whether per-token-per-head scales are stored) for a ``kv_cache_dtype`` name."""
    if kv_cache_dtype == "auto":
        return model_dtype, False
    if kv_cache_dtype not in KV_QUANT_FORMATS:
        raise BadInputError(f"kv_cache_dtype={kv_cache_dtype!r}: choose one of {', '.join(KV_CACHE_DTYPES)}")
    return KV_QUANT_FORMATS[kv_cache_dtype][0], True


def qmax_of(cache_dtype: torch.dtype) -> float:
    """Largest magnitude a quantized cache dtype stores (the scale maps each head's absmax onto it)."""
    for dtype, qmax in KV_QUANT_FORMATS.values():
        if dtype == cache_dtype:
            return qmax
    raise BadInputError(f"{cache_dtype} is not a quantized KV-cache dtype; use one of {', '.join(KV_QUANT_FORMATS)}")


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., head_dim]`` -> (values in ``cache_dtype``, fp16 scales ``[...]``); see the module docstring."""
    qmax = qmax_of(cache_dtype)
    xf = x.float()
    scale = (xf.abs().amax(-1) / qmax).clamp_min(MIN_SCALE).to(SCALE_DTYPE)
    q = xf / scale.float().unsqueeze(-1)
    if cache_dtype == torch.int8:
        q = torch.floor(q + 0.5).clamp_(-qmax, qmax)
    else:
        q = q.clamp_(-qmax, qmax)
    return q.to(cache_dtype), scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize_kv`` (up to the rounding): ``q [..., head_dim] * scale [...]`` in ``dtype``.

    fp32 math (exact: 8-bit values times 11-bit scales), in place, so a long context's gather holds one fp32 copy."""
    x = q.to(torch.float32, copy=True)
    return x.mul_(scale.float().unsqueeze(-1)).to(dtype)
