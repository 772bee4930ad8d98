"""``onecard vision``: LLaVA-style image question answering."""

from __future__ import annotations

import json

import typer

from onecard.vision.images import DEFAULT_MAX_PIXELS


def register(app: typer.Typer) -> None:
    @app.command("vision")
    def vision_cmd(
        model: str = typer.Argument(..., help="Local LLaVA model folder (transformers layout, e.g. llava-hf/llava-1.5-7b-hf)."),
        image: str = typer.Argument(..., help="Image file path, or a data:image/...;base64 URL."),
        question: str = typer.Argument(..., help="The question about the image."),
        max_tokens: int = typer.Option(256, "--max-tokens", help="Most tokens to generate."),
        temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
        top_p: float = typer.Option(1.0, "--top-p"),
        seed: int = typer.Option(None, "--seed", help="Sampling seed (reproducible output)."),
        int4: bool = typer.Option(True, "--int4/--no-int4", help="Language model in int4 (vision tower stays float)."),
        stream: bool = typer.Option(False, "--stream", help="Print the answer as it is generated."),
        backend: str = typer.Option("auto", "--backend", help="auto (engine when supported), engine or hf."),
        max_model_len: int = typer.Option(None, "--max-model-len", help="Context incl. image tokens (default: model's, <= 4096)."),
        max_image_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-image-pixels", help="Refuse larger images."),
        dtype: str = typer.Option("auto", "--dtype", help="auto, bfloat16, float16 or float32."),
        device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda if present)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object (answer, backend, timings)."),
    ) -> None:
        """Answer a question about an image with a LLaVA-family model (int4 language model by default)."""
        from rich.console import Console

        from onecard.vision import VisionConfig, VisionModel
        from onecard.vision.images import load_image

        load_image(image, max_image_pixels)  # bad image: fail before loading gigabytes of weights
        cfg = VisionConfig(device=device, dtype=dtype, int4=int4, backend=backend, max_model_len=max_model_len,
                           max_image_pixels=max_image_pixels)
        console = Console(stderr=as_json)
        vm = VisionModel.from_pretrained(model, cfg, progress=not as_json)
        on_text = (lambda s: console.print(s, end="", markup=False, highlight=False)) if stream and not as_json else None
        ans = vm.generate(image, question, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                          on_text=on_text)
        if as_json:
            typer.echo(json.dumps({"answer": ans.text, "backend": ans.backend, "finish_reason": ans.finish_reason,
                                   "prompt_tokens": ans.num_prompt_tokens, "image_tokens": ans.num_image_tokens,
                                   "completion_tokens": len(ans.token_ids),
                                   "time_to_first_token_s": ans.time_to_first_token_s,
                                   "decode_tokens_per_s": ans.decode_tokens_per_s}))
            return
        if on_text is None:
            console.print(ans.text, markup=False, highlight=False)
        else:
            console.print()
        rate = f"{ans.decode_tokens_per_s:.1f} tok/s decode" if ans.decode_tokens_per_s else "1 token"
        console.print(f"[dim]{ans.backend} backend{', int4 LM' if int4 else ''}: {ans.num_prompt_tokens} prompt tokens "
                      f"({ans.num_image_tokens} image), {len(ans.token_ids)} generated, first token "
                      f"{ans.time_to_first_token_s:.2f} s, {rate}, finish: {ans.finish_reason}[/]")
