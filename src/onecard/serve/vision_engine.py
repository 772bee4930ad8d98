"""The server's engine for a LLaVA folder: ``AsyncEngine``'s serving surface over ``onecard.vision.VisionModel``.

``onecard serve LLAVA_DIR`` answers ``/v1/chat/completions`` requests that
carry one ``image_url`` part (a ``data:`` URL) through the same path as
``onecard vision``: the processor expands ``<image>`` to one token per patch,
the CLIP tower + projector's features replace those tokens' embeddings, and the
language model decodes on onecard's engine (or HF ``generate``, the fallback).
A chat without an image (one turn or many) goes through the folder's chat
template to the same language model with no image features: a LLaVA server is
also a plain chat server.
Because the route, the streaming, the metrics and the abort-on-disconnect code
only see ``generate`` / ``abort`` / ``stats`` / ``tokenizer``, they are the
text server's, unchanged.

``VisionModel`` holds one sequence at a time (image prompts cannot share
prefix blocks, and llava-1.5 answers one picture per request), so requests run
one after another in a worker thread; the others wait in line and show in
``onecard_num_requests_waiting``. A client that hangs up stops its answer at
the next token and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from onecard.engine.outputs import CompletionOutput, RequestOutput
from onecard.errors import BadInputError, OnecardError

log = logging.getLogger(__name__)


@dataclass
class ImagePrompt:
    """One chat request, prepared: the model's input tensors (``pixel_values`` only with an image) and the prompt's
    token ids (image patches included). ``len()`` is the prompt's token count, which the server's context-length
    check and usage counts use."""

    inputs: dict
    token_ids: list[int]

    def __len__(self) -> int:
        return len(self.token_ids)


class VisionEngineStopped(OnecardError):
    """The vision engine was shut down; no more requests run."""


class VisionEngine:
    """Serve a ``VisionModel``: prepare image prompts, run them one at a time, stream cumulative outputs."""

    accepts_images = True

    def __init__(self, model) -> None:
        self.model = model
        self.tokenizer = model.processor.tokenizer
        self.max_model_len = model.max_model_len
        self._lock = asyncio.Lock()
        self._cancel: dict[str, threading.Event] = {}
        self._jobs: set[asyncio.Task] = set()
        self._waiting = 0
        self._running = 0
        self._stopped = False

    @property
    def ready(self) -> bool:
        return not self._stopped

    def options(self) -> dict:
        """What /v1/models and /metrics report (engine_info.py): the vision path's fixed choices and its backend."""
        m = self.model
        return {"backend": m.backend, "dtype": str(m.dtype).removeprefix("torch."),
                "quantization": "rtn-int4" if m.config.int4 else None, "kv_cache_dtype": "auto",
                "speculative_method": None, "offload_layers": 0, "enable_prefix_caching": False, "max_num_seqs": 1,
                "max_model_len": self.max_model_len}

    def stats(self) -> dict:
        used, total = self.model.kv_blocks()
        return {"num_running": self._running, "num_waiting": self._waiting, "kv_blocks_used": used,
                "kv_blocks_total": total, "kv_usage": used / total if total else 0.0, "ready": self.ready}

    async def prepare(self, image: bytes, question: str) -> ImagePrompt:
        """Decode and check the image, build the prompt (the model's chat template) and run the processor,
        off the event loop; a bad image or question raises ``BadInputError``."""
        inputs = await asyncio.to_thread(self.model.prepare, image, question)
        return ImagePrompt(inputs, inputs["input_ids"][0].tolist())

    def prepare_text(self, messages: list[dict]) -> ImagePrompt:
        """A chat without an image: ``messages`` (``{"role", "content": str}``) through the folder's chat template,
        tokenized as the processor tokenizes image prompts (with BOS); an ``<image>`` placeholder in the text is a
        ``BadInputError`` (there is no image to put there)."""
        text = text_chat_prompt(self.model.processor, messages)
        ids = self.tokenizer(text, return_tensors="pt")
        if (ids["input_ids"] == self.model.image_token_index).any():
            raise BadInputError("the messages contain the image placeholder token but no image_url part; remove the "
                                "placeholder or send the image as an image_url content part")
        device = self.model.device
        return ImagePrompt({"input_ids": ids["input_ids"].to(device), "attention_mask": ids["attention_mask"].to(device)},
                           ids["input_ids"][0].tolist())

    def check_params(self, params) -> None:
        """Refuse what the LLaVA path does not implement, naming the field (the text engine does all of them)."""
        unsupported = [("n", params.n != 1), ("logprobs", params.logprobs is not None), ("stop", bool(params.stop)),
                       ("stop_token_ids", bool(params.stop_token_ids)),
                       ("structured outputs (response_format, guided_*)", params.structured is not None),
                       ("logit_bias", bool(params.logit_bias)), ("min_tokens", params.min_tokens > 0),
                       ("prompt logprobs (echo with logprobs)", params.prompt_logprobs is not None)]
        if self.model.backend == "hf":  # HF generate gets temperature, top_p, seed only
            unsupported += [("top_k", params.top_k not in (0, -1)), ("min_p", params.min_p != 0.0),
                            ("repetition_penalty", params.repetition_penalty != 1.0),
                            ("presence_penalty", params.presence_penalty != 0.0),
                            ("frequency_penalty", params.frequency_penalty != 0.0)]
        for name, bad in unsupported:
            if bad:
                raise BadInputError(f"'{name}' is not supported by onecard serve on a LLaVA folder "
                                    f"({self.model.backend} backend); remove it")

    async def generate(self, prompt: ImagePrompt, params, request_id: str) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one image request, the last one ``finished``; leaving early cancels it."""
        if self._stopped:
            raise VisionEngineStopped("the vision engine is shut down; retry after the server restarts")
        if request_id in self._cancel:
            raise BadInputError(f"request_id '{request_id}' is already in use; pass a unique id")
        self.check_params(params)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        cancel = self._cancel[request_id] = threading.Event()
        job = asyncio.create_task(self._job(prompt, params, request_id, cancel, loop, outputs))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            cancel.set()  # no-op when finished; otherwise the worker stops at its next token and frees the blocks

    async def _job(self, prompt: ImagePrompt, params, request_id: str, cancel: threading.Event,
                   loop: asyncio.AbstractEventLoop, outputs: asyncio.Queue) -> None:
        """Wait for the model, run the request in a worker thread; always ends with a finished output or an error."""
        self._waiting += 1
        try:
            async with self._lock:
                self._waiting -= 1
                if cancel.is_set():
                    outputs.put_nowait(self._output(request_id, prompt, [], "abort"))
                    return
                self._running = 1
                try:
                    await asyncio.to_thread(self._run, prompt, params, request_id, cancel, loop, outputs)
                finally:
                    self._running = 0
        except BaseException as err:  # reported to the request's stream, never lost in a task
            cancel.set()
            outputs.put_nowait(err if isinstance(err, Exception) else VisionEngineStopped("cancelled"))
            if not isinstance(err, Exception):
                raise
        finally:
            self._cancel.pop(request_id, None)

    def _run(self, prompt: ImagePrompt, params, request_id: str, cancel: threading.Event,
             loop: asyncio.AbstractEventLoop, outputs: asyncio.Queue) -> None:
        """Worker thread: the model's generation loop, one cumulative output per token handed to the event loop."""
        sent = ""

        def on_tokens(tokens: list[int]) -> None:
            nonlocal sent
            text = self.tokenizer.decode(tokens, skip_special_tokens=params.skip_special_tokens)
            if not text.endswith("\ufffd"):  # half a UTF-8 character: wait for the next token
                sent = text
            loop.call_soon_threadsafe(outputs.put_nowait, self._output(request_id, prompt, tokens, None, sent))

        tokens, reason, _, _ = self.model.run_prepared(prompt.inputs, params, on_tokens, cancel)
        text = self.tokenizer.decode(self.model.answer_tokens(tokens, reason),
                                     skip_special_tokens=params.skip_special_tokens)
        loop.call_soon_threadsafe(outputs.put_nowait, self._output(request_id, prompt, tokens, reason, text))

    @staticmethod
    def _output(request_id: str, prompt: ImagePrompt, tokens: list[int], reason: str | None,
                text: str = "") -> RequestOutput:
        return RequestOutput(request_id, None, prompt.token_ids, [CompletionOutput(0, text, list(tokens), reason)],
                             reason is not None, {"num_prompt_tokens": len(prompt), "num_generated_tokens": len(tokens),
                                                  "finished_time": time.time() if reason else None})

    async def abort(self, request_id: str) -> None:
        """Stop a request at its next token (its stream ends with finish_reason 'abort'; KV blocks freed)."""
        cancel = self._cancel.get(request_id)
        if cancel is not None:
            cancel.set()

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Refuse new requests, stop the running and waiting ones, wait up to ``timeout`` s for the worker."""
        self._stopped = True
        for cancel in list(self._cancel.values()):
            cancel.set()
        if self._jobs:
            await asyncio.wait(set(self._jobs), timeout=timeout)


def text_chat_prompt(processor, messages: list[dict]) -> str:
    """A text-only conversation as the model was trained to read it: the folder's chat template (the processor's,
    which takes content as parts), else llava-1.5's Vicuna format (``USER: q ASSISTANT: a</s>... ASSISTANT:``)."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
        try:
            return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # jinja errors from the folder's template (e.g. roles it does not allow)
            raise BadInputError(f"the model's chat template rejected these messages: {err}".splitlines()[0]) from None
    eos = processor.tokenizer.eos_token or ""
    turns = [m["content"] if m["role"] in ("system", "developer") else
             f"USER: {m['content']}" if m["role"] == "user" else f"ASSISTANT: {m['content']}{eos}" for m in messages]
    return " ".join(turns) + " ASSISTANT:"


async def chat_prompt(engine, messages: list[dict], has_images: bool, model_name: str) -> ImagePrompt:
    """The prompt of a chat request to a LLaVA engine (an image question, or text only), or the 400 of an image
    sent to a text-only model; 400s name the problem. ``messages``: the request's, as plain dicts."""
    from onecard.serve.errors import bad_request
    from onecard.vision.openai_messages import image_question

    if not getattr(engine, "accepts_images", False):
        raise bad_request(f"The model '{model_name}' is text-only (no vision tower), so it cannot read image_url "
                          "content parts; send text only, or serve a LLaVA model folder", "messages",
                          "image_input_not_supported")
    try:
        if not has_images:
            return engine.prepare_text([{"role": m["role"], "content": _text(m["content"])} for m in messages])
        image, question = image_question(messages)
        return await engine.prepare(image, question)
    except (BadInputError, NotImplementedError) as err:  # NotBuiltYetError: multi-turn image chat
        raise bad_request(str(err), "messages") from None


def _text(content) -> str:
    """A message's text: the string, or its text parts joined (the request has no image parts here)."""
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
