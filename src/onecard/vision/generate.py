"""Image question answering: one image + one question in, an answer out, through one of two paths.

- ``engine``: the CLIP tower + projector (HF modules, float) turn the image into
  embeddings that replace the ``<image>`` placeholders; onecard's own Llama
  forward (int4 ``QuantLinear``, paged KV cache, CUDA-graph decode) runs the
  language model with them as prefix embeddings. The fast path.
- ``hf``: transformers ``LlavaForConditionalGeneration.generate`` with the
  language model's linears swapped for int4 ``QuantLinear``. Always available:
  the fallback for language models our forward does not implement.

``VisionModel.from_pretrained(path)`` picks ``engine`` when it can and logs
which path runs; every answer records it in ``VisionAnswer.backend``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from onecard.errors import (
    BadInputError,
    NotBuiltYetError,
    OnecardError,
    UnsupportedModelError,
)
from onecard.vision.images import DEFAULT_MAX_PIXELS, load_image
from onecard.vision.loader import (
    LlavaFolder,
    load_llava,
    load_processor,
    open_llava_folder,
)
from onecard.vision.prompt import build_prompt

log = logging.getLogger(__name__)
BACKENDS = ("auto", "engine", "hf")


@dataclass
class VisionAnswer:
    """An answer and how it was made (which path, prompt size, timings)."""

    text: str
    token_ids: list[int]
    finish_reason: str            # "stop" (end-of-sequence token) or "length" (max_tokens / context full)
    backend: str                  # "engine" or "hf": which path ran
    num_prompt_tokens: int        # including the image's patch tokens
    num_image_tokens: int
    time_to_first_token_s: float  # image encoding + prefill + first sample
    decode_tokens_per_s: float | None  # tokens after the first / their time; None with < 2 tokens
    timings: dict = field(default_factory=dict)


@dataclass
class VisionConfig:
    """How to load and run a LLaVA folder; validated on construction."""

    device: str | None = None         # None: cuda if available, else cpu
    dtype: str = "auto"               # auto: the checkpoint's float16/bfloat16 on GPU, float32 on CPU
    int4: bool = True                 # language model in int4 (RTN g128); vision tower + projector stay float
    backend: str = "auto"             # auto | engine | hf
    max_model_len: int | None = None  # engine context (prompt incl. image tokens + answer); None: model's, <= 4096
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    enforce_eager: bool = False       # engine: no CUDA graphs (debugging)
    gpu_memory_utilization: float = 0.9

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise BadInputError(f"backend={self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise BadInputError(f"dtype={self.dtype!r}: choose auto, float32, float16 or bfloat16")
        if self.max_image_pixels < 1:
            raise BadInputError(f"max_image_pixels={self.max_image_pixels}: must be positive, e.g. {DEFAULT_MAX_PIXELS}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise BadInputError(f"max_model_len={self.max_model_len}: must be at least 2")


class VisionModel:
    """A loaded LLaVA model + processor, answering questions about images."""

    def __init__(self, folder: LlavaFolder | None, processor, hf_model, config: VisionConfig, device: torch.device,
                 dtype: torch.dtype, progress: bool = False) -> None:
        """Take an already-loaded HF ``LlavaForConditionalGeneration`` (on CPU or ``device``) and place it.

        ``folder`` may be None for a model built in memory (benchmarks); the text config then comes from
        ``hf_model.config`` instead of config.json.
        """
        have = next(hf_model.parameters()).dtype
        if have != dtype:
            raise BadInputError(f"the model's weights are {have} but dtype={dtype}; load it in {dtype} "
                                "(VisionModel moves devices, it never casts)")
        self.folder, self.processor, self.hf, self.config = folder, processor, hf_model, config
        self.device, self.dtype = device, dtype
        cfg = hf_model.config
        self.image_token_index = cfg.image_token_index
        self.vision_feature_layer = cfg.vision_feature_layer
        self.vision_feature_select_strategy = cfg.vision_feature_select_strategy
        self.backend, self.why = self._choose_backend(config.backend)
        quant = "rtn-int4" if config.int4 else None
        if self.backend == "engine":
            self._build_engine(quant, progress)
        else:
            from onecard.vision.int4 import place_llava_

            place_llava_(hf_model, device, quant, progress)
        log.info("onecard vision: %s backend (%s)", self.backend, self.why)
        tok = processor.tokenizer
        eos = cfg.text_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tok.eos_token_id is not None:
            self.eos_ids.add(tok.eos_token_id)

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, config: VisionConfig | None = None, progress: bool = False,
                        **kwargs) -> VisionModel:
        """Validate ``path``, load processor and weights (on the CPU first when the LM is quantized), place them."""
        from onecard.engine.llm import resolve_device, resolve_dtype

        config = config or VisionConfig(**kwargs)
        lf = open_llava_folder(path)
        processor = load_processor(lf)
        device = resolve_device(config.device)
        declared = lf.config.get("torch_dtype") or lf.config.get("dtype")
        dtype = resolve_dtype(config.dtype, declared, device)
        # int4 / engine: read float weights into host memory, then stream layer by layer to the card (int4.py).
        load_device = "cpu" if (config.int4 or config.backend != "hf") else device
        hf = load_llava(lf, dtype, load_device)
        return cls(lf, processor, hf, config, device, dtype, progress)

    def _choose_backend(self, wanted: str) -> tuple[str, str]:
        if wanted == "hf":
            return "hf", "asked for"
        try:
            self.args = self._text_args()
        except OnecardError as exc:
            if wanted == "engine":
                raise UnsupportedModelError(f"backend='engine' cannot run this language model ({exc}); use backend='hf'") from None
            return "hf", f"onecard's engine does not run this language model: {exc}"
        return "engine", "language model on onecard's engine" + (" (int4)" if self.config.int4 else "")

    def _text_args(self):
        from onecard.models.config import ModelArgs
        from onecard.vision.loader import TEXT_ARCHITECTURES, hf_text_config

        text = dict(self.folder.config["text_config"]) if self.folder else hf_text_config(self.hf.config.text_config)
        kind = text.get("model_type", "llama")
        if kind not in TEXT_ARCHITECTURES:
            raise UnsupportedModelError(f"text model_type {kind!r} (supported: {', '.join(TEXT_ARCHITECTURES)})")
        text["architectures"] = [TEXT_ARCHITECTURES[kind]]
        return ModelArgs.from_hf_config(text)

    def _build_engine(self, quant: str | None, progress: bool) -> None:
        from onecard.engine.block_manager import BlockManager
        from onecard.engine.config import EngineConfig
        from onecard.engine.model_runner import ModelRunner
        from onecard.vision.language_model import onecard_language_model

        hf = self.hf
        for part in (hf.model.vision_tower, hf.model.multi_modal_projector):
            part.to(self.device)  # already in self.dtype (loaded so)
        max_len = self.config.max_model_len or min(self.args.max_position_embeddings, 4096)
        if self.args.sliding_window is not None and max_len > self.args.sliding_window:
            raise NotBuiltYetError(f"sliding-window attention is not implemented; set max_model_len <= "
                                   f"{self.args.sliding_window} (the language model's sliding_window)")
        self.lm = onecard_language_model(hf, self.args, self.device, self.dtype, quant, max_positions=max_len,
                                         progress=progress)
        hf.model.language_model = None  # its weights now live in self.lm: free them
        hf.lm_head = None
        ecfg = EngineConfig(str(self.folder.path) if self.folder else "<in-memory>", max_model_len=max_len,
                            max_num_seqs=1, max_num_batched_tokens=max_len, device=str(self.device),
                            enforce_eager=self.config.enforce_eager,
                            gpu_memory_utilization=self.config.gpu_memory_utilization)
        ecfg.resolve(self.args.max_position_embeddings)
        self.engine_config = ecfg
        self.runner = ModelRunner(self.lm, ecfg, self.device)
        # No prefix caching, ever: every image's placeholder ids are the same token, so blocks keyed by token ids
        # would hand one picture's keys/values to the next.
        self.block_manager = BlockManager(self.runner.num_blocks, ecfg.block_size)

    @property
    def max_model_len(self) -> int:
        """Longest prompt (image tokens included) + answer a request may have."""
        if self.backend == "engine":
            return self.engine_config.max_model_len
        return self.config.max_model_len or self.hf.config.text_config.max_position_embeddings

    # ---- inputs ------------------------------------------------------------------------------------------------
    def prepare(self, image, question: str, use_chat_template: bool = True) -> dict:
        """Processor outputs for one image + question: ``input_ids [1, T]`` (image token repeated per patch),
        ``attention_mask``, ``pixel_values [1, 3, H, W]`` (resized/cropped/normalized per the model's config)."""
        img = load_image(image, self.config.max_image_pixels)
        prompt = build_prompt(self.processor, question, use_chat_template)
        inputs = self.processor(images=img, text=prompt, return_tensors="pt")
        return {"input_ids": inputs["input_ids"].to(self.device), "attention_mask": inputs["attention_mask"].to(self.device),
                "pixel_values": inputs["pixel_values"].to(self.device, self.dtype)}

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP tower -> selected layer -> projector: ``[num_patches, hidden]`` in the LM's embedding space."""
        out = self.hf.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=self.vision_feature_layer,
            vision_feature_select_strategy=self.vision_feature_select_strategy, return_dict=True)
        feats = out.pooler_output
        return torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])

    def _prefix_embeddings(self, ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image features written over the ``<image>`` positions (``ids`` is flat)."""
        embeds = self.lm.embed_tokens(ids)
        mask = ids == self.image_token_index
        feats = self.image_features(pixel_values).to(embeds.dtype)
        if int(mask.sum()) != feats.shape[0]:
            raise BadInputError(f"the prompt has {int(mask.sum())} image tokens but the image gives {feats.shape[0]} "
                                "features; the processor settings do not match the model's vision config")
        embeds[mask] = feats
        return embeds

    @torch.no_grad()
    def prompt_logits(self, image, question: str) -> torch.Tensor:
        """Logits ``[T, vocab]`` over the whole prompt (float32) through this model's path: the logits tests."""
        inputs = self.prepare(image, question)
        if self.backend == "hf":
            return self.hf(**inputs).logits[0].float()
        ids = inputs["input_ids"][0]
        positions = torch.arange(ids.shape[0], device=self.device)
        hidden = self.lm(ids, positions, None, inputs_embeds=self._prefix_embeddings(ids, inputs["pixel_values"]))
        return self.lm.compute_logits(hidden).float()

    # ---- generation --------------------------------------------------------------------------------------------
    def generate(self, image, question: str, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, on_text: Callable[[str], None] | None = None,
                 ignore_eos: bool = False) -> VisionAnswer:
        """Answer ``question`` about ``image``: greedy at temperature 0, else sampled (``top_p``, ``seed``).

        ``on_text(delta)`` streams the answer as it is generated. ``ignore_eos`` generates exactly
        ``max_tokens`` (benchmarks: a random model may say end-of-sequence at any step).
        """
        from onecard.engine.sampling_params import SamplingParams

        if max_tokens is None or max_tokens < 1:
            raise BadInputError(f"max_tokens={max_tokens}: must be a positive integer")
        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                                ignore_eos=ignore_eos)
        t0 = _now(self.device)
        inputs = self.prepare(image, question)
        n_image = int((inputs["input_ids"] == self.image_token_index).sum())
        tokens, reason, t_first, t_end = self.run_prepared(inputs, params, _Stream(self.processor.tokenizer, on_text).push)
        text = self.processor.tokenizer.decode(self.answer_tokens(tokens, reason), skip_special_tokens=True)
        rate = (len(tokens) - 1) / (t_end - t_first) if len(tokens) > 1 and t_end > t_first else None
        return VisionAnswer(text.strip(), tokens, reason, self.backend, int(inputs["input_ids"].shape[1]), n_image,
                            t_first - t0, rate, {"total_s": t_end - t0})

    @staticmethod
    def answer_tokens(tokens: list[int], reason: str) -> list[int]:
        """The tokens that make the answer's text: without the end-of-sequence token that stopped it."""
        return tokens[:-1] if reason == "stop" else tokens

    def run_prepared(self, inputs: dict, params, on_tokens: Callable[[list[int]], None] | None = None,
                     cancel: threading.Event | None = None) -> tuple[list[int], str, float, float]:
        """Generate from ``prepare``'s outputs with ``params`` (a ``SamplingParams``; the hf backend honours
        temperature, top_p, seed, max_tokens and ignore_eos). Returns (token ids, finish reason, time of the first
        token, time of the last).

        ``on_tokens(all tokens so far)`` runs after every token; setting ``cancel`` stops the loop with reason
        ``"abort"`` and frees the sequence's KV blocks (the server's client hung up).
        """
        run = self._generate_engine if self.backend == "engine" else self._generate_hf
        return run(inputs, params, on_tokens or (lambda tokens: None), cancel or threading.Event())

    def kv_blocks(self) -> tuple[int, int]:
        """(KV-cache blocks in use, blocks in all) of the engine backend; (0, 0) on the hf backend."""
        if self.backend != "engine":
            return 0, 0
        bm = self.block_manager
        return bm.num_blocks - bm.num_free_blocks, bm.num_blocks

    @torch.no_grad()
    def _generate_engine(self, inputs: dict, params, on_tokens, cancel: threading.Event):
        from onecard.engine.sampler import sample
        from onecard.engine.sequence import Sequence

        ids = inputs["input_ids"][0]
        n = ids.shape[0]
        if n >= self.engine_config.max_model_len:
            raise BadInputError(f"the prompt is {n} tokens (image included) but max_model_len="
                                f"{self.engine_config.max_model_len} leaves no room to answer; raise max_model_len")
        gen = torch.Generator(device=self.device).manual_seed(params.seed) if params.seed is not None else None
        seq = Sequence("vision", 0, ids.tolist(), params, gen)
        bm = self.block_manager
        bm.allocate(seq)
        try:
            flat_ids, positions, meta, last = self.runner.prepare_prefill([seq])
            pixels = inputs.get("pixel_values")  # None: a text-only chat (onecard serve), no image features
            embeds = self._prefix_embeddings(flat_ids, pixels) if pixels is not None else None
            hidden = self.lm(flat_ids, positions, meta, inputs_embeds=embeds)
            out = sample(self.lm.compute_logits(hidden.index_select(0, last)).float(), [seq])
            t_first = _now(self.device)
            while True:
                token = out.token_ids[0]
                seq.token_ids.append(token)
                on_tokens(seq.completion_token_ids)
                reason = self._finish(token, seq.num_completion_tokens, len(seq), params)
                if reason is None and cancel.is_set():
                    reason = "abort"
                if reason is None and not bm.can_append(seq):
                    reason = "length"
                if reason is not None:
                    break
                bm.may_append(seq)
                out = self.runner.run([seq], False)
            t_end = _now(self.device)
        finally:
            bm.deallocate(seq)
        return seq.completion_token_ids, reason, t_first, t_end

    def _finish(self, token: int, num_generated: int, total_len: int, params) -> str | None:
        if token in self.eos_ids and not params.ignore_eos:
            return "stop"
        if num_generated >= params.max_tokens or total_len >= self.engine_config.max_model_len:
            return "length"
        return None

    @torch.no_grad()
    def _generate_hf(self, inputs: dict, params, on_tokens, cancel: threading.Event):
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        times: list[float] = []
        collected: list[int] = []
        device = self.device

        class _Collect(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:  # generate() first hands over the prompt
                    self.prompt_seen = True
                    return
                times.append(_now(device))
                collected.extend(value.reshape(-1).tolist())
                on_tokens(list(collected))

            def end(self) -> None:
                pass

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        if params.seed is not None:
            torch.manual_seed(params.seed)
        kwargs = {"min_new_tokens": params.max_tokens} if params.ignore_eos else {}
        kwargs |= {"do_sample": False} if params.temperature == 0 else {
            "do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
        out = self.hf.generate(**inputs, max_new_tokens=params.max_tokens, streamer=_Collect(),
                               eos_token_id=sorted(self.eos_ids), pad_token_id=self.processor.tokenizer.pad_token_id,
                               stopping_criteria=StoppingCriteriaList([_Cancelled()]), **kwargs)
        tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
        reason = "stop" if tokens and tokens[-1] in self.eos_ids and not params.ignore_eos else "length"
        if reason == "length" and len(tokens) < params.max_tokens and cancel.is_set():
            reason = "abort"
        t_end = _now(device)
        return tokens, reason, times[0] if times else t_end, t_end


class _Stream:
    """Turns the growing token list into text deltas for ``on_text`` (holds back half-decoded characters)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None) -> None:
        self.tokenizer, self.on_text, self.sent = tokenizer, on_text, ""

    def push(self, tokens: list[int]) -> None:
        if self.on_text is None:
            return
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return
        if len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
