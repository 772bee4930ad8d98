"""The vision paths on a GPU: our engine (CUDA-graph decode, Triton int4) against HF on the same card."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from onecard.vision import VisionModel
from onecard.vision.testing import make_llava_checkpoint

pytestmark = pytest.mark.gpu
QUESTION = "What shapes are in the picture?"


def shapes_image() -> Image.Image:
    img = Image.new("RGB", (400, 300), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([40, 40, 180, 160], fill="red")
    d.ellipse([200, 100, 380, 280], fill="blue")
    return img


@pytest.fixture(scope="module")
def llava_dir():
    return make_llava_checkpoint(init_std=0.2)  # full 336x336 CLIP input: 576 image tokens


def test_engine_matches_hf_on_gpu_fp32(llava_dir):
    eng = VisionModel.from_pretrained(llava_dir, device="cuda", dtype="float32", int4=False, backend="engine")
    hf = VisionModel.from_pretrained(llava_dir, device="cuda", dtype="float32", int4=False, backend="hf")
    img = shapes_image()
    torch.testing.assert_close(eng.prompt_logits(img, QUESTION), hf.prompt_logits(img, QUESTION), atol=2e-3, rtol=1e-3)
    a, b = eng.generate(img, QUESTION, max_tokens=12), hf.generate(img, QUESTION, max_tokens=12)
    assert eng.runner.graphs, "decode should replay a CUDA graph"
    assert a.num_image_tokens == 576 and a.token_ids == b.token_ids


def test_int4_engine_on_gpu(llava_dir):
    eng = VisionModel.from_pretrained(llava_dir, device="cuda", dtype="bfloat16", int4=True, backend="engine")
    hf = VisionModel.from_pretrained(llava_dir, device="cuda", dtype="bfloat16", int4=True, backend="hf")
    img = shapes_image()
    a, b = eng.prompt_logits(img, QUESTION), hf.prompt_logits(img, QUESTION)
    assert (a - b).abs().max() < 0.1 * b.abs().max()  # same int4 weights; bf16 rounding differs by op order
    ans = eng.generate(img, QUESTION, max_tokens=16, ignore_eos=True)
    assert len(ans.token_ids) == 16 and ans.decode_tokens_per_s > 0
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
