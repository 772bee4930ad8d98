"""Architectures our own forward does not implement, run through HF ``generate`` behind the engine's interface.

Same methods as ``LLMEngine`` (validate / add_request / step / abort_request /
has_unfinished_requests / stats), so ``LLM`` and ``AsyncEngine`` work unchanged;
but there is no paged cache or continuous batching: each ``step`` runs one
request to completion with HF. Options HF ``generate`` has no equivalent for
(presence/frequency penalties, logprobs) are refused per request, not ignored.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import torch

from onecard.engine.config import EngineConfig
from onecard.engine.outputs import CompletionOutput, RequestOutput
from onecard.engine.sampling_params import SamplingParams
from onecard.errors import BadInputError, NotBuiltYetError

log = logging.getLogger(__name__)
_warned: set[str] = set()


class HFFallbackEngine:
    def __init__(self, config: EngineConfig, folder, tokenizer, device: torch.device) -> None:
        from transformers import AutoModelForCausalLM

        arch = folder.architecture
        if arch not in _warned:
            _warned.add(arch)
            log.warning("%s is not implemented by onecard's engine: running it through HF transformers generate "
                        "(no paged KV cache, no continuous batching: slower)", arch)
        if config.num_speculative_tokens:
            raise NotBuiltYetError(f"num_speculative_tokens={config.num_speculative_tokens}: speculative decoding "
                                   f"runs on onecard's own engine only, not on the HF fallback this architecture "
                                   "uses; drop num_speculative_tokens")
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        if config.dtype != "auto":
            dtype = getattr(torch, config.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(str(folder.path), dtype=dtype).to(device).eval()
        max_pos = getattr(self.model.config, "max_position_embeddings", None) or getattr(self.model.config, "n_positions", 2048)
        config.resolve(max_pos)
        self.eos_token_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.incremental_text = False  # interface parity with LLMEngine; text is decoded once per request
        self.waiting: deque[tuple[str, str | None, list[int], SamplingParams, float]] = deque()
        self.num_generated_tokens = 0

    def encode(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str) and prompt:
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise BadInputError("prompt is empty or not a string / list of token ids; pass at least one token")

    def validate(self, prompt, params: SamplingParams | None):
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise BadInputError(f"sampling_params must be a SamplingParams, not {type(params).__name__}")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(params, name) != 0:
                raise BadInputError(f"{name} is not supported for {self.model.config.architectures} (HF fallback path); "
                                    "set it to 0")
        if params.logprobs is not None:
            raise BadInputError("logprobs is not supported on the HF fallback path; set logprobs=None")
        if params.logit_bias or params.min_tokens or params.prompt_logprobs is not None:
            raise BadInputError("logit_bias, min_tokens and prompt_logprobs are not supported on the HF fallback path; "
                                "drop them")
        if params.structured is not None:
            raise BadInputError(f"{params.structured[0]} (structured outputs) is not supported on the HF fallback "
                                "path; drop it")
        text, ids = self.encode(prompt)
        if len(ids) >= self.config.max_model_len:
            raise BadInputError(f"prompt is {len(ids)} tokens but max_model_len={self.config.max_model_len} leaves no "
                                "room to generate; shorten the prompt or raise max_model_len")
        return text, ids, params

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None, arrival_time=None):
        text, ids, params = self.validate(prompt, params)
        self.waiting.append((request_id, text, ids, params, arrival_time or time.time()))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        for item in list(self.waiting):
            if item[0] == request_id:
                self.waiting.remove(item)
                rid, text, ids, params, arrival = item
                comps = [CompletionOutput(i, "", [], "abort") for i in range(params.n)]
                return RequestOutput(rid, text, ids, comps, True, {"arrival_time": arrival, "first_token_time": None,
                                     "finished_time": time.time(), "num_prompt_tokens": len(ids), "num_generated_tokens": 0})
        return None

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting)

    @torch.no_grad()
    def step(self, stream: bool = True) -> list[RequestOutput]:  # every output it returns is final
        if not self.waiting:
            return []
        rid, text, ids, p, arrival = self.waiting.popleft()
        max_new = min(p.max_tokens or self.config.max_model_len, self.config.max_model_len - len(ids))
        kwargs = {"max_new_tokens": max_new, "num_return_sequences": p.n, "repetition_penalty": p.repetition_penalty,
                  "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id}
        if p.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or None,
                          min_p=p.min_p or None)
        eos = sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids))
        kwargs["eos_token_id"] = eos or None
        if p.ignore_eos and not p.stop_token_ids:
            kwargs["min_new_tokens"] = max_new
        if p.seed is not None:
            torch.manual_seed(p.seed)
        x = torch.tensor([ids], device=self.device)
        out = self.model.generate(x, attention_mask=torch.ones_like(x), **kwargs)[:, len(ids):].tolist()
        now = time.time()
        comps = []
        for i, toks in enumerate(out):
            stop_at = next((j for j, t in enumerate(toks) if t in eos), None)
            if stop_at is not None:
                toks, reason = toks[:stop_at + 1], "stop"
                body = toks[:-1]
            else:
                reason, body = "length", toks
            text_out = self.tokenizer.decode(body, skip_special_tokens=p.skip_special_tokens)
            hits = [k for k in (text_out.find(s) for s in p.stop) if k >= 0]
            if hits:
                text_out, reason = text_out[:min(hits)], "stop"
            comps.append(CompletionOutput(i, text_out, toks, reason))
            self.num_generated_tokens += len(toks)
        return [RequestOutput(rid, text, ids, comps, True, {
            "arrival_time": arrival, "first_token_time": now, "finished_time": now, "num_prompt_tokens": len(ids),
            "num_generated_tokens": sum(len(c.token_ids) for c in comps)})]

    def stats(self) -> dict:
        return {"num_running": 0, "num_waiting": len(self.waiting), "num_requests": len(self.waiting),
                "kv_blocks_total": 0, "kv_blocks_used": 0, "kv_usage": 0.0, "num_preemptions": 0,
                "num_generated_tokens": self.num_generated_tokens, "max_model_len": self.config.max_model_len,
                "max_num_seqs": self.config.max_num_seqs, "cuda_graphs": [], "backend": "hf-fallback"}
