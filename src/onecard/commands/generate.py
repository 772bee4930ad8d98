"""``onecard generate``: offline batch generation with onecard's engine."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from onecard.commands.engine_options import with_engine_options
from onecard.errors import BadInputError


def read_prompts(prompt: str | None, file: Path | None) -> list[str]:
    """The prompt argument plus one prompt per non-empty line of ``file`` (use \\n inside a line for newlines)."""
    prompts = [prompt] if prompt is not None else []
    if file is not None:
        if not file.exists():
            raise BadInputError(f"--file '{file}' does not exist; pass a text file with one prompt per line")
        prompts += [line.replace("\\n", "\n") for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise BadInputError("no prompt given; pass one as an argument or --file prompts.txt")
    return prompts


def read_schema(path: Path) -> dict:
    """A JSON Schema file's contents; a missing or non-JSON file is a one-line error."""
    if not path.is_file():
        raise BadInputError(f"--json-schema '{path}' does not exist; pass a JSON Schema file")
    try:
        schema = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BadInputError(f"--json-schema '{path}' is not JSON ({e}); pass a JSON Schema file") from None
    if not isinstance(schema, dict):
        raise BadInputError(f"--json-schema '{path}' holds a {type(schema).__name__}, not a JSON Schema object")
    return schema


def register(app: typer.Typer) -> None:
    @app.command("generate")
    @with_engine_options
    def generate_cmd(
        model: str = typer.Argument(..., help="Local Hugging Face model folder."),
        prompt: str = typer.Argument(None, help="The prompt (or use --file)."),
        file: Path = typer.Option(None, "--file", help="Text file, one prompt per line."),
        max_tokens: int = typer.Option(128, "--max-tokens", help="Tokens to generate per prompt."),
        temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
        top_p: float = typer.Option(1.0, "--top-p"),
        top_k: int = typer.Option(0, "--top-k", help="0 = off."),
        seed: int = typer.Option(None, "--seed", help="Per-request sampling seed (reproducible output)."),
        json_schema: Path = typer.Option(None, "--json-schema", help="A JSON Schema file: every output is JSON "
                                         "that matches it (structured outputs, needs xgrammar)."),
        regex: str = typer.Option(None, "--regex", help="Every output matches this regular expression."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object per prompt."),
        *,
        engine: dict,
    ) -> None:
        """Generate text with onecard's engine (paged KV cache, continuous batching, CUDA-graph decode)."""
        import time

        from rich.console import Console

        from onecard.engine import LLM, SamplingParams

        prompts = read_prompts(prompt, file)
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_tokens=max_tokens,
                                json_schema=read_schema(json_schema) if json_schema is not None else None,
                                regex=regex)
        llm = LLM(model, **engine)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=not as_json)
        seconds = time.perf_counter() - t0
        if as_json:
            for o in outs:
                c = o.outputs[0]
                typer.echo(json.dumps({"prompt": o.prompt, "text": c.text, "finish_reason": c.finish_reason,
                                       "prompt_tokens": len(o.prompt_token_ids), "completion_tokens": len(c.token_ids)}))
            return
        console = Console()
        for o in outs:
            console.rule(f"[dim]{o.prompt[:60]!r}")
            console.print(o.prompt, end="", style="bold", markup=False, highlight=False)
            console.print(o.outputs[0].text, markup=False, highlight=False)
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        console.print(f"[dim]{len(outs)} prompts, {n} tokens in {seconds:.2f} s = {n / seconds:.1f} tok/s[/]")
