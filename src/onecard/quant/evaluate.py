"""Perplexity of a model folder (float or GPTQ/AWQ) on a text file: the number ``onecard eval ppl`` prints.

Float folders run through transformers; quantized folders through the same HF
model with our ``QuantLinear`` (``load_quantized_hf``), so both sides of a
comparison share one forward and one protocol.
"""

from __future__ import annotations

from pathlib import Path

import torch

from onecard.bench.perplexity import PerplexityResult, hf_logits_fn, sliding_window_perplexity
from onecard.errors import BadInputError
from onecard.models.folder import open_model_folder


def load_for_eval(model_dir: str | Path, device: str, dtype: torch.dtype):
    folder = open_model_folder(model_dir)
    if folder.quantization_config:
        from onecard.quant.loader import load_quantized_hf

        return folder, load_quantized_hf(folder, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM

    return folder, AutoModelForCausalLM.from_pretrained(str(folder.path), dtype=dtype).to(device).eval()


def text_ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)


def model_perplexity(model_dir: str | Path, text: str, context: int = 2048, stride: int = 512,
                     max_tokens: int | None = None, device: str | None = None,
                     dtype: torch.dtype | None = None) -> PerplexityResult:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    folder = open_model_folder(model_dir)
    max_pos = folder.model_args().max_position_embeddings
    if context > max_pos:
        raise BadInputError(f"--context {context} exceeds the model's max_position_embeddings {max_pos}; "
                            f"use --context {max_pos} or less")
    ids = text_ids(folder.load_tokenizer(), text)
    folder, model = load_for_eval(folder.path, device, dtype)
    return sliding_window_perplexity(hf_logits_fn(model), ids, context, stride, max_tokens)
