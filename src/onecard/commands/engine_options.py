"""The engine's command-line options, shared by ``onecard generate`` and ``onecard serve``.

``ENGINE_FLAGS`` is the one table from a vLLM-style flag to an ``EngineConfig``
field; defaults come from ``EngineConfig`` itself, so the CLI can never drift
from the engine. ``with_engine_options`` adds the table's options to a typer
command and hands the command one ``engine`` dict (only the options the user
changed), ready for ``LLM(model, **engine)`` / ``AsyncEngine(model, **engine)``.
Left out on purpose: test and tuning internals (``num_kv_blocks``,
``cuda_graph_max_batch``, ``fused_rope_store``, ``fused_prefill_rope``, ``fused_decode_attention``,
``programmatic_launch``) and the engine ``seed``
(``generate --seed`` and the request's ``seed`` are per-request sampling seeds).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import typer

from onecard.engine.config import DTYPES, EngineConfig
from onecard.kernels.kv_quant import KV_CACHE_DTYPES


def _offload(value: str) -> int | str:
    """``--offload-layers``: a count, or ``auto`` (the planner's); anything else reaches EngineConfig's check."""
    return int(value) if value.strip().isdigit() else value


@dataclass(frozen=True)
class EngineFlag:
    """One command-line option: its ``EngineConfig`` field, flag spelling(s), click type and help."""

    field: str
    flags: tuple[str, ...]
    type: type
    help: str
    parse: Callable[[object], object] | None = None  # CLI value -> EngineConfig value


ENGINE_FLAGS: tuple[EngineFlag, ...] = (
    EngineFlag("dtype", ("--dtype",), str, f"Weights and activations: {', '.join(DTYPES)}."),
    EngineFlag("device", ("--device",), str, "cpu, cuda or cuda:N (default: cuda if present)."),
    EngineFlag("quantization", ("--quantization",), str, "On-the-fly weight quantization: rtn-int4, int8 or fp8 "
               "(weights and activations; RTX 40xx/H100) (a GPTQ/AWQ folder is read as stored)."),
    EngineFlag("int4_kernel", ("--int4-kernel",), str, "int4 matmul on CUDA: triton (onecard's; tensor cores at "
               "2-64 sequences) or tinygemm (PyTorch's; slower at 1-64 sequences and prefill on H100/H200; bf16, "
               "no offload)."),
    EngineFlag("decode_gemv", ("--decode-gemv/--no-decode-gemv",), bool, "CUDA: bf16/fp16 linears at batch-1 "
               "decode through onecard's Triton GEMV (off: cuBLAS; default: on, off with speculation)."),
    EngineFlag("max_model_len", ("--max-model-len",), int, "Context length: prompt + output (default: the model's, "
               "capped at 8192)."),
    EngineFlag("max_num_seqs", ("--max-num-seqs",), int, "Most sequences decoded together."),
    EngineFlag("admit_batch_size", ("--admit-batch-size",), int, "While requests decode, waiting ones join when this "
               "many seats are free (or all fit): fewer one-prompt prefill steps (default: max-num-seqs / 8)."),
    EngineFlag("max_num_batched_tokens", ("--max-num-batched-tokens",), int, "Most tokens one engine step computes "
               "(default: 8192 with chunked prefill)."),
    EngineFlag("gpu_memory_utilization", ("--gpu-memory-utilization",), float, "Share of GPU memory for weights + "
               "KV cache, in (0, 1]."),
    EngineFlag("block_size", ("--block-size",), int, "Tokens per KV-cache block (8..256, a power of two)."),
    EngineFlag("kv_cache_dtype", ("--kv-cache-dtype",), str, f"KV-cache storage: {', '.join(KV_CACHE_DTYPES)} "
               "(auto: the model dtype; fp8/int8 hold ~2x the context)."),
    EngineFlag("enable_prefix_caching", ("--enable-prefix-caching/--no-enable-prefix-caching",), bool,
               "Reuse the KV cache of identical prompt prefixes across requests."),
    EngineFlag("enable_chunked_prefill", ("--enable-chunked-prefill/--no-enable-chunked-prefill",), bool,
               "Split long prompts into chunks interleaved with decode steps."),
    EngineFlag("long_prefill_chunk", ("--long-prefill-chunk",), int, "Most prompt tokens one sequence computes "
               "per step (chunked prefill; default: the step budget)."),
    EngineFlag("enforce_eager", ("--enforce-eager",), bool, "No CUDA graphs (debugging; slower decode)."),
    EngineFlag("async_scheduling", ("--async-scheduling/--no-async-scheduling",), bool, "Prepare the next decode "
               "step while the GPU runs this one (default: on for CUDA, off with speculation or --tp)."),
    EngineFlag("num_speculative_tokens", ("--num-speculative-tokens",), int, "Speculative decoding: draft tokens "
               "per step (0 = off); n-gram prompt lookup unless --speculative-model is given."),
    EngineFlag("ngram_size", ("--ngram-size",), int, "n-gram speculation: longest context suffix looked up."),
    EngineFlag("ngram_min_size", ("--ngram-min-size",), int, "n-gram speculation: shortest suffix that may draft."),
    EngineFlag("speculative_model", ("--speculative-model",), str, "A small model folder with the same tokenizer "
               "that drafts instead of n-grams (needs --num-speculative-tokens)."),
    EngineFlag("offload_layers", ("--offload-layers",), str, "Decoder layers kept in pinned CPU memory and streamed "
               "in per step: a number, or auto (the planner's count).", _offload),
    EngineFlag("tensor_parallel_size", ("--tp", "--tensor-parallel-size"), int, "Tensor parallel: shard the model "
               "over this many GPUs (spawns workers)."),
    EngineFlag("tp_all_reduce", ("--tp-all-reduce",), str, "Tensor parallel sums: auto (small ones through PyTorch "
               "symmetric memory where the GPUs reach each other, decode sums fused into the next norm), one-shot "
               "(the same without the fusion) or nccl."),
)

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)}


def _default(flag: EngineFlag):
    value = _DEFAULTS[flag.field]
    return str(value) if flag.parse is not None and value is not None else value


def _parameter(flag: EngineFlag) -> inspect.Parameter:
    default = _default(flag)
    annotation = flag.type if default is not None else flag.type | None
    option = typer.Option(default, *flag.flags, help=flag.help, show_default=default is not None)
    return inspect.Parameter(flag.field, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def engine_kwargs(values: dict[str, object]) -> dict[str, object]:
    """The ``EngineConfig`` keyword arguments the user changed (parsed), keyed by field, from the flags' values."""
    out = {}
    for flag in ENGINE_FLAGS:
        value = values[flag.field]
        if value == _default(flag):
            continue
        out[flag.field] = flag.parse(value) if flag.parse is not None else value
    return out


def with_engine_options(command: Callable) -> Callable:
    """Give a typer command every ``ENGINE_FLAGS`` option; the command receives them as ``engine`` (a dict of
    changed ``EngineConfig`` fields) and must take that keyword instead of declaring the options itself."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for name, p in signature.parameters.items() if name != "engine"]
    clash = {p.name for p in own} & {f.field for f in ENGINE_FLAGS}
    if clash or "engine" not in signature.parameters:
        raise TypeError(f"{command.__name__} must take 'engine' and none of the engine fields itself ({clash})")
    params = [*own, *(_parameter(f) for f in ENGINE_FLAGS)]

    @functools.wraps(command)
    def wrapper(**values):
        engine = engine_kwargs({f.field: values.pop(f.field) for f in ENGINE_FLAGS})
        return command(**values, engine=engine)

    wrapper.__signature__ = signature.replace(parameters=params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper

