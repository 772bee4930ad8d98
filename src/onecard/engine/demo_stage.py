"""Demo stage: onecard's engine on the demo's tiny trained model (CPU or GPU), a few prompts, tok/s."""

from __future__ import annotations

import time

from rich.text import Text

from onecard.demo import DemoContext, StageResult

PROMPTS = ["def read_config(path):\n", "import os\n", "class Parser:\n    def __init__(self", "for line in f"]


def demo_stage(ctx: DemoContext) -> StageResult:
    from onecard.engine import LLM, SamplingParams

    # An explicit, small cache (every prompt at full length): the demo's later stages need the GPU memory
    # that gpu_memory_utilization=0.9 would otherwise hand to this engine's KV cache.
    llm = LLM(ctx.artifacts["model_dir"], max_model_len=256, max_num_seqs=len(PROMPTS), block_size=16,
              num_kv_blocks=len(PROMPTS) * 256 // 16, device=ctx.device)
    llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    # the label styled, the model's text printed as is (it may hold brackets that markup would eat)
    ctx.console.print(Text.assemble(("engine: ", "dim"), PROMPTS[0] + outs[0].outputs[0].text), highlight=False)
    stats = llm.stats()
    ctx.artifacts["engine_tok_s"] = tokens / seconds
    del llm
    graphs = f", CUDA graphs for {len(stats['cuda_graphs'])} batch sizes" if stats["cuda_graphs"] else ""
    return StageResult("generate (engine)", f"{len(PROMPTS)} prompts batched, {tokens} tokens greedy in {seconds:.2f} s = "
                       f"{tokens / seconds:.0f} tok/s; paged KV {stats['kv_blocks_total']} blocks x "
                       f"{stats['block_size']}{graphs}")
