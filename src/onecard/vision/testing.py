"""A small random-weight LLaVA folder (real llava-1.5 shape, scaled down) with everything ``AutoProcessor`` needs.

``onecard.testing.make_random_checkpoint("llava-1.5-7b", "tiny")`` gives the
weights and a text tokenizer; an image question needs more: an ``<image>``
token in the tokenizer at ``image_token_index``, the CLIP image processor's
``preprocessor_config.json``, the processor's settings and the llava-1.5 chat
template. This module adds them, so tests and ``--smoke`` benchmarks use the
same folder layout as ``llava-hf/llava-1.5-7b-hf``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from onecard.models.arch import arch_config, scale_config

# llava-hf/llava-1.5-7b-hf's chat template: "USER: <image>\n{text} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# CLIP ViT-L/14-336's image processor (openai/clip-vit-large-patch14-336, as llava-1.5 ships it).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def llava_tiny_config(arch: str = "llava-1.5-7b", size: str = "tiny", image_size: int | None = None,
                      init_std: float | None = None) -> dict:
    """``scale_config`` of a built-in LLaVA config, with the text vocab right after the test tokenizer's 4096 tokens.

    The ``<image>`` token is appended to the 4096-token test tokenizer, so it
    gets id 4096; the real model has it at 32000 after Vicuna's 32000 tokens.
    """
    cfg = scale_config(arch_config(arch), size)
    cfg.pop("_onecard_source", None)
    cfg["image_token_index"] = 4096
    cfg["text_config"]["vocab_size"] = 4096 + 64  # room for <image> and <pad>, rounded up like llava-hf's 32064
    if init_std is not None:  # wider random weights: greedy answers vary token to token, so comparisons can fail
        cfg["text_config"]["initializer_range"] = init_std
    if image_size is not None:
        cfg["vision_config"]["image_size"] = image_size
        cfg["image_seq_length"] = (image_size // cfg["vision_config"]["patch_size"]) ** 2
    return cfg


def make_llava_checkpoint(arch: str = "llava-1.5-7b", size: str = "tiny", path: str | Path | None = None, *,
                          dtype: str = "float32", seed: int = 0, image_size: int | None = None,
                          init_std: float | None = None) -> Path:
    """Write (or reuse from the cache) a random LLaVA folder that ``LlavaForConditionalGeneration`` and
    ``AutoProcessor`` load: weights, tokenizer with ``<image>``, preprocessor and processor configs, chat template.

    ``image_size`` shrinks the CLIP input (112 -> 64 patches instead of 576: fast CPU tests).
    """
    from onecard.testing import make_random_checkpoint
    from onecard.testing.checkpoints import cache_dir, publish_dir

    cfg = llava_tiny_config(arch, size, image_size, init_std)
    if path is None:
        tag = hashlib.sha1(json.dumps([cfg, dtype, seed, LLAVA_CHAT_TEMPLATE], sort_keys=True).encode()).hexdigest()[:8]
        final = cache_dir() / f"vision-{arch}-{size}-{dtype}-s{seed}-{tag}"
        if (final / "processor_config.json").exists():
            return final
        out = final.with_name(final.name + f".tmp{os.getpid()}")
        shutil.rmtree(out, ignore_errors=True)
    else:
        final = out = Path(path)
    overrides = {k: v for k, v in cfg.items() if k in ("image_token_index", "text_config", "vision_config", "image_seq_length")}
    make_random_checkpoint(arch, size, out, dtype=dtype, seed=seed, overrides=overrides)
    add_processor_files(out, cfg["vision_config"]["image_size"], cfg["vision_config"]["patch_size"],
                        cfg["image_token_index"])
    if out != final:
        publish_dir(out, final)
    return final


def llava_processor(tokenizer_dir: str | Path, image_size: int = 336, patch_size: int = 14):
    """A ``LlavaProcessor`` (CLIP-336 image processor settings, llava-1.5 chat template) around the tokenizer in
    ``tokenizer_dir`` with ``<image>`` appended; returns ``(processor, image_token_id)``."""
    from transformers import AutoTokenizer, LlavaProcessor

    from onecard.vision.loader import clip_image_processor

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = clip_image_processor({
        "do_resize": True, "size": {"shortest_edge": image_size}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_convert_rgb": True})
    proc = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                          vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE,
                          image_token="<image>", num_additional_image_tokens=1)
    return proc, tok.convert_tokens_to_ids("<image>")


def add_processor_files(folder: Path, image_size: int, patch_size: int, image_token_index: int) -> None:
    """Add ``<image>`` to the folder's tokenizer and write the CLIP image processor + LlavaProcessor settings."""
    proc, got = llava_processor(folder, image_size, patch_size)
    if got != image_token_index:
        raise AssertionError(f"<image> got id {got}, the config says {image_token_index}")
    proc.save_pretrained(str(folder))
    proc.image_processor.save_pretrained(str(folder))  # preprocessor_config.json: the llava-hf folders' layout
