"""``LLM``: offline generation with onecard's engine, shaped like vLLM's ``LLM``.

    llm = LLM("path/to/model")
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))

Builds the engine from a local HF folder (``build_engine``); architectures our
own forward does not implement run through HF ``generate`` behind the same API
(``hf_fallback``), with one log line saying so.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import torch

from onecard.engine.config import DEFAULT_MAX_MODEL_LEN_CAP, EngineConfig
from onecard.engine.outputs import RequestOutput
from onecard.engine.sampling_params import SamplingParams
from onecard.errors import BadInputError, DoesNotFitError, NotBuiltYetError
from onecard.models import SUPPORTED_ARCHITECTURES, open_model_folder

log = logging.getLogger(__name__)
GiB = 1 << 30


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"device={device!r} but no CUDA GPU is visible; pass device='cpu' or check `onecard doctor`")
    return torch.device(device)


def resolve_dtype(dtype: str, declared: str | None, device: torch.device) -> torch.dtype:
    """'auto' = the checkpoint's dtype on GPU (float16/bfloat16), float32 on CPU (CPU half matmuls are slow and lossy)."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cpu":
        return torch.float32
    if declared in ("float16", "bfloat16"):
        return getattr(torch, declared)
    return torch.bfloat16


def eos_ids(folder_path: Path, config: dict, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (config, _read_json(folder_path / "generation_config.json")):
        eos = src.get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def build_engine(config: EngineConfig, progress: bool = False, card_memory=None):
    """Load model + tokenizer and return an ``LLMEngine`` (our forward) or an ``HFFallbackEngine``.

    Before loading weights, a planner preflight (``onecard.plan.preflight``) checks the job against the card:
    ``card_memory`` (an ``onecard.plan.CardMemory``) or, on CUDA, the live card's free memory and per-process cap.
    """
    folder = open_model_folder(config.model, supported=None)
    tokenizer = folder.load_tokenizer()
    device = resolve_device(config.device)
    if config.seed is not None:
        torch.manual_seed(config.seed)
    if not any(a in SUPPORTED_ARCHITECTURES for a in folder.config.get("architectures") or []):
        from onecard.engine.hf_fallback import HFFallbackEngine

        if config.tensor_parallel_size > 1:
            raise NotBuiltYetError(f"tensor_parallel_size={config.tensor_parallel_size} needs onecard's own forward; "
                                   f"{folder.config.get('architectures')} runs through HF generate on one device")
        return HFFallbackEngine(config, folder, tokenizer, device)
    args = folder.model_args()
    user_max_model_len = config.max_model_len
    if config.max_model_len is None and args.sliding_window is not None:
        config.max_model_len = min(args.max_position_embeddings, args.sliding_window, DEFAULT_MAX_MODEL_LEN_CAP)
    config.resolve(args.max_position_embeddings)
    if args.sliding_window is not None and config.max_model_len > args.sliding_window:
        raise NotBuiltYetError(f"sliding-window attention is not implemented; set max_model_len <= "
                               f"{args.sliding_window} (the model's sliding_window)")
    dtype = resolve_dtype(config.dtype, folder.weight_dtype() if folder.quantization_config is None else args.torch_dtype,
                          device)
    if config.tensor_parallel_size == 1 and not config.offload_layers:  # both exist to run what one card can't hold
        _preflight(folder, config, user_max_model_len, dtype, device, card_memory)
    from onecard.engine.draft_model import build_proposer, load_draft
    from onecard.engine.llm_engine import LLMEngine
    from onecard.engine.model_runner import ModelRunner

    if config.tensor_parallel_size > 1:  # one shard per GPU; this process is rank 0 (tp_engine.py)
        from onecard.engine.tp_engine import start_tp_runner

        runner = start_tp_runner(config, folder, dtype, device, progress)
        drafter = None
    else:  # a speculative draft model loads before the target's KV sizing, which pays for the draft's cache too
        model = _load_model(folder, config, dtype, device, progress)
        draft = load_draft(config, folder, tokenizer, dtype, device, progress) if config.speculative_model else None
        runner = ModelRunner(model, config, device, draft_model=draft)
        drafter = build_proposer(draft, config, runner) if draft is not None else None
    return LLMEngine(config, runner, tokenizer, eos_ids(folder.path, folder.config, tokenizer), drafter)


def _preflight(folder, config: EngineConfig, user_max_model_len: int | None, dtype: torch.dtype, device: torch.device,
               card_memory) -> None:
    """Refuse (``DoesNotFitError``) before loading when the KV pool could not hold one max_model_len sequence;
    pick max_model_len when the user left it unset and the default does not fit. Skipped when ``num_kv_blocks``
    fixes the pool or no card is known (CPU without ``card_memory``)."""
    from onecard.plan.card_memory import live_card_memory
    from onecard.plan.preflight import engine_preflight

    memory = card_memory if card_memory is not None else live_card_memory(device)
    if memory is None or config.num_kv_blocks is not None:
        return
    check = engine_preflight(folder.config, memory, max_model_len=user_max_model_len,
                             default_max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs,
                             max_num_batched_tokens=config.max_num_batched_tokens,
                             gpu_memory_utilization=config.gpu_memory_utilization, dtype_bytes=dtype.itemsize,
                             quantization=config.quantization, block_size=config.block_size,
                             enforce_eager=config.enforce_eager, cuda_graph_max_batch=config.cuda_graph_max_batch,
                             kv_cache_dtype=config.kv_cache_dtype,
                             num_speculative_tokens=config.num_speculative_tokens,
                             draft_model=open_model_folder(config.speculative_model).config
                             if config.speculative_model else None)
    config.max_model_len = check.max_model_len


def check_quant_request(folder, config: EngineConfig, dtype: torch.dtype, device: torch.device, offload: int) -> None:
    """Quantization settings that cannot apply, refused before anything loads (one GPU or tensor-parallel), never
    silently dropped."""
    if folder.quantization_config is not None and config.quantization is not None:
        raise BadInputError(f"quantization={config.quantization!r} but '{folder.path}' is already quantized "
                            f"({folder.quantization_config.get('quant_method', '?')}); drop quantization=")
    from onecard.quant.fp8 import check_fp8_device
    from onecard.quant.fp8_checkpoint import fp8_checkpoint_format

    spec = None
    if config.quantization is not None:
        from onecard.quant.config import QuantSpec

        spec = QuantSpec.parse(config.quantization)
    if (spec is not None and spec.float8) or fp8_checkpoint_format(folder.quantization_config):
        check_fp8_device(device)
    if config.int4_kernel == "tinygemm":
        if folder.quantization_config is None and config.quantization is None:
            raise BadInputError(f"int4_kernel={config.int4_kernel!r} applies to int4 weights but "
                                f"'{folder.path}' is not quantized; add quantization='rtn-int4' or drop int4_kernel")
        if spec is not None and (spec.bits != 4 or spec.float8):
            raise BadInputError(f"int4_kernel='tinygemm' applies to int4 weights, not quantization="
                                f"{config.quantization!r}; use quantization='rtn-int4' or drop int4_kernel")
        if device.type != "cuda" or dtype != torch.bfloat16:
            raise BadInputError(f"int4_kernel='tinygemm' needs CUDA and bfloat16 (got {device.type}, {dtype}); "
                                "use int4_kernel='triton'")
        if offload:
            raise BadInputError("int4_kernel='tinygemm' repacks weights on the GPU and cannot stream offloaded "
                                "layers; use int4_kernel='triton' with offload_layers")


def _load_model(folder, config: EngineConfig, dtype: torch.dtype, device: torch.device, progress: bool):
    model = _build_model(folder, config, dtype, device, progress)
    use_decode_kernels_(model, config, device)
    return model


def use_decode_kernels_(model, config: EngineConfig, device: torch.device) -> None:
    """Send the model's bs=1 linears through the Triton GEMV where ``config.decode_gemv`` (resolved) says so, and
    launch the decode kernels with PDL as ``config.programmatic_launch`` says (before any graph is captured)."""
    from onecard.kernels.launch import set_programmatic_launch

    set_programmatic_launch(config.programmatic_launch)
    if config.uses_gemv(device.type == "cuda"):
        from onecard.kernels.gemv import use_gemv_linears_

        log.info("decode GEMV (Triton) for %d linears", use_gemv_linears_(model))


def _build_model(folder, config: EngineConfig, dtype: torch.dtype, device: torch.device, progress: bool):
    from onecard.models.loader import load_model

    offload = _offload_count(folder, config, device)
    check_quant_request(folder, config, dtype, device, offload)
    if not offload:
        if device.type == "cuda" and folder.quantization_config is None and config.quantization is None:
            free, _ = torch.cuda.mem_get_info(device)
            need = folder.model_args().num_parameters() * torch.tensor([], dtype=dtype).element_size()
            if need > free * config.gpu_memory_utilization:
                raise DoesNotFitError(f"the {dtype} weights need {need / GiB:.1f} GiB but {free / GiB:.1f} GiB is "
                                      f"free (x{config.gpu_memory_utilization} utilization); use quantization="
                                      "'rtn-int4', a quantized checkpoint or offload_layers='auto'")
        if folder.quantization_config is not None:
            model = _quant_function("load_quantized_model", "loading GPTQ/AWQ checkpoints")(folder, dtype, device)
        elif config.quantization is not None:  # layer by layer: the dense model is never whole on the device
            load_rtn = _quant_function("load_rtn_model", "on-the-fly quantization")
            model = load_rtn(folder, config.quantization, dtype, device, progress=progress)
        else:
            return load_model(folder, dtype, device, max_positions=None, progress=progress)
        if config.int4_kernel == "tinygemm":
            n = _quant_function("use_tinygemm_", "PyTorch's int4 kernel")(model)
            log.info("int4 kernel: PyTorch's _weight_int4pack_mm for %d layers", n)
        return model
    # offloading: build on the host, then place layer by layer (quantizing each on the card first)
    if config.programmatic_launch:
        raise BadInputError("programmatic_launch=True cannot be combined with offload_layers: the GEMV kernels read "
                            "weights before their PDL wait, and offloaded weights arrive on a copy stream; leave it None")
    config.programmatic_launch = False  # eager and bound by the host link anyway: PDL would gain nothing
    cpu = torch.device("cpu")
    if folder.quantization_config is not None:
        model = _quant_function("load_quantized_model", "loading GPTQ/AWQ checkpoints")(folder, dtype, cpu)
    else:
        model = load_model(folder, dtype, cpu, max_positions=None, progress=progress)
    quantize = config.quantization and _quant_function("quantize_model_", "on-the-fly quantization")
    from onecard.engine.offload import describe_offload, offload_layers, quantize_layer

    offload_layers(model, offload, device, quantize and (lambda layer: quantize_layer(quantize, layer, config.quantization)))
    config.enforce_eager = True  # graphs would capture one layer's copy; the streamer re-issues them every step
    d = describe_offload(model, device)
    log.warning("offloading %d of %d decoder layers (%.2f GiB) to pinned CPU memory: expected ~%.2f tok/s at bs=1 "
                "(host link %.1f GB/s measured, bound %.2f tok/s); CUDA graphs off", d["offload_layers"],
                d["num_layers"], d["offloaded_gib"], d["expected_tok_s"], d["h2d_gbs"], d["pcie_bound_tok_s"])
    return model


def _offload_count(folder, config: EngineConfig, device: torch.device) -> int:
    if config.offload_layers != "auto":
        return config.offload_layers
    from onecard.engine.offload import plan_offload_layers

    return plan_offload_layers(folder.path, device, config)


def _quant_function(name: str, what: str):
    try:
        from onecard import quant
    except ImportError:
        quant = None
    fn = getattr(quant, name, None)
    if fn is None:
        raise NotBuiltYetError(f"{what} (onecard.quant.{name}) is not available yet; run the unquantized model")
    return fn


class LLM:
    """Offline batch generation. Keyword arguments are ``EngineConfig`` fields, plus ``card_memory``: plan the
    start-up preflight against this ``onecard.plan.CardMemory`` instead of the live card."""

    def __init__(self, model: str | Path, dtype: str = "auto", gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 block_size: int = 16, enforce_eager: bool = False, quantization: str | None = None,
                 kv_cache_dtype: str = "auto", seed: int = 0, device: str | None = None, tensor_parallel_size: int = 1,
                 card_memory=None, **engine_kwargs) -> None:
        self.config = EngineConfig(model, dtype, gpu_memory_utilization, max_model_len, max_num_seqs,
                                   max_num_batched_tokens, block_size, enforce_eager, quantization, kv_cache_dtype, seed,
                                   device, tensor_parallel_size, **engine_kwargs)
        self.engine = build_engine(self.config, progress=True, card_memory=card_memory)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, order: str = "longest_first") -> list[RequestOutput]:
        """Generate for every prompt; returns finished outputs in input order.

        ``order``: how the batch is queued. "longest_first" (default) queues the requests with the largest output
        budget (``max_tokens``, else what ``max_model_len`` leaves) first; equal budgets keep their order, so one
        shared ``SamplingParams`` changes nothing. Why: the caller gets every output at once, so only the batch's
        end counts, and requests that would start late and decode for long leave a tail of steps at a few
        sequences each (1000 prompts, H100: 1,706 -> 1,116 steps, 1.11x output tok/s; results/
        engine_offline_order_fp8_fp8.json). "submitted" queues them as given (the server always does: first come,
        first served).
        A bad prompt or parameter raises ``BadInputError`` before anything runs.
        """
        if order not in ("longest_first", "submitted"):
            raise BadInputError(f"order={order!r}: choose 'longest_first' (the default) or 'submitted'")
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise BadInputError("prompts must be a non-empty string or list of strings / token-id lists")
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise BadInputError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts; pass one "
                                    "SamplingParams or one per prompt")
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        budgets = []
        for p, sp in zip(prompts, params):  # validate everything first: no half-run batch on a bad input
            _, tokens, sp = self.engine.validate(p, sp)
            budgets.append(sp.max_tokens or self.engine.config.max_model_len - len(tokens))
        ids = [f"gen-{uuid.uuid4().hex[:12]}" for _ in prompts]
        queue = longest_output_first(budgets) if order == "longest_first" else range(len(prompts))
        for i in queue:
            self.engine.add_request(ids[i], prompts[i], params[i])
        results: dict[str, RequestOutput] = {}
        try:
            with _progress(use_tqdm, len(prompts)) as advance:
                while self.engine.has_unfinished_requests():
                    for out in self.engine.step(stream=False):
                        if out.finished:
                            results[out.request_id] = out
                            advance()
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return [results[rid] for rid in ids]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the tokenizer's chat template (with the generation prompt) to each conversation and generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        if not convs:
            raise BadInputError("messages is empty; pass a list of {'role', 'content'} dicts")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise BadInputError("this model's tokenizer has no chat template; use generate() with a plain prompt")
        prompts = []
        for conv in convs:
            if not all(isinstance(m, dict) and "role" in m and "content" in m for m in conv):
                raise BadInputError("each message must be a dict with 'role' and 'content'")
            ids = self.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
            prompts.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
        return self.generate(prompts, sampling_params, use_tqdm)

    def stats(self) -> dict:
        return self.engine.stats()


def longest_output_first(budgets: list[int]) -> list[int]:
    """Indices of a batch's requests by output budget, largest first; ties keep their order (a stable sort).

    Offline, the batch ends when its longest request does. Queued as drawn, the long requests that happen to start
    late decode alone at the end, a few sequences a step, each step still reading every weight; started first,
    they overlap the rest of the batch (the scheduling rule of longest processing time first)."""
    return sorted(range(len(budgets)), key=lambda i: -budgets[i])


class _progress:
    """A rich progress bar over finished requests (or nothing when disabled)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self.bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), transient=True)
        self.bar.start()
        task = self.bar.add_task("generating", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()
