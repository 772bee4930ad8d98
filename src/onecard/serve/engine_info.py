"""The options the served engine runs with, as ``/v1/models`` and ``/metrics`` report them.

A client or a dashboard should not have to read the server's command line to
know whether the KV cache is fp8, speculation is on or layers are streamed
from host memory: the numbers it sees depend on them. The values are the
engine's configuration after start-up (``max_model_len`` resolved against the
model); ``offload_layers`` stays ``"auto"`` when the planner chose the count.
"""

from __future__ import annotations


def engine_options(engine) -> dict[str, object]:
    """``engine.options()`` where the engine defines it (the LLaVA engine), else read off its ``EngineConfig``
    (empty for an engine with neither, such as the tests' stand-in)."""
    own = getattr(engine, "options", None)
    if callable(own):
        return own()
    c = getattr(engine, "config", None)
    if c is None:
        return {}
    method = ("draft_model" if c.speculative_model is not None else "ngram") if c.num_speculative_tokens else None
    return {"dtype": c.dtype, "quantization": c.quantization, "kv_cache_dtype": c.kv_cache_dtype,
            "speculative_method": method, "num_speculative_tokens": c.num_speculative_tokens,
            "speculative_model": str(c.speculative_model) if c.speculative_model is not None else None,
            "offload_layers": c.offload_layers, "enable_prefix_caching": c.enable_prefix_caching,
            "enable_chunked_prefill": c.enable_chunked_prefill, "tensor_parallel_size": c.tensor_parallel_size,
            "max_num_seqs": c.max_num_seqs, "max_model_len": c.max_model_len}
