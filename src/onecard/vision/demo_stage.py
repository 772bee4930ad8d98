"""Demo stage: image question answering end to end on a tiny random LLaVA (llava-1.5 shape, scaled down).

The weights are random, so the answer is noise; what the stage shows is the
path a real LLaVA folder takes: folder + processor validation, a drawn PNG,
CLIP tower + projector, int4 language model on onecard's engine, streaming.
"""

from __future__ import annotations

from onecard.demo import DemoContext, StageResult

QUESTION = "What shapes are in this picture?"


def demo_stage(ctx: DemoContext) -> StageResult:
    from PIL import Image, ImageDraw

    from onecard.vision import VisionModel
    from onecard.vision.testing import make_llava_checkpoint

    model_dir = make_llava_checkpoint(image_size=112, init_std=0.2)
    image = ctx.workdir / "shapes.png"
    img = Image.new("RGB", (224, 168), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([20, 20, 100, 90], fill="red")
    draw.ellipse([120, 60, 210, 150], fill="blue")
    img.save(image)
    vm = VisionModel.from_pretrained(model_dir, device=ctx.device, int4=True, max_model_len=256)
    if ctx.device.startswith("cuda"):
        vm.generate(image, QUESTION, max_tokens=2)  # warm-up: Triton compiles
    # int4 on a CPU dequantizes every weight at every step (no kernel there): few tokens keep the stage short.
    ans = vm.generate(image, QUESTION, max_tokens=16 if ctx.device.startswith("cuda") else 6, ignore_eos=True)
    ctx.console.print(f"[dim]vision ({ans.backend}, random weights):[/] {QUESTION} -> {ans.text[:60]!r}",
                      highlight=False)
    ctx.artifacts["vision_model_dir"] = model_dir
    ctx.artifacts["vision_tok_s"] = ans.decode_tokens_per_s
    del vm
    rate = f"{ans.decode_tokens_per_s:.0f} tok/s" if ans.decode_tokens_per_s else "-"
    return StageResult("vision (LLaVA)", f"{image.name}: {ans.num_image_tokens} image + "
                       f"{ans.num_prompt_tokens - ans.num_image_tokens} text tokens, {ans.backend} backend, int4 LM, "
                       f"first token {ans.time_to_first_token_s * 1000:.0f} ms, {rate} (random tiny LLaVA)")
