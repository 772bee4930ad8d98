"""``onecard demo`` stage: quantize the tiny trained model to int4 and show what it cost in perplexity.

RTN, not GPTQ: the stage must stay well under a minute on CPU, and GPTQ of this
model (4 x 128 calibration tokens) took minutes on a loaded 2-core machine;
`onecard quantize --method gptq` is the real path.
"""

from __future__ import annotations

from onecard.demo import DemoContext, StageResult

CONTEXT, STRIDE, TOKENS = 256, 128, 2048


def demo_stage(ctx: DemoContext) -> StageResult:
    """Quantize ``ctx.artifacts["model_dir"]`` (RTN int4, group 64, GPTQ layout); sets ``quantized_dir``."""
    import torch

    from onecard.bench.perplexity import hf_logits_fn, sliding_window_perplexity
    from onecard.quant import QuantConfig, quantize_model_folder
    from onecard.quant.evaluate import load_for_eval, text_ids
    from onecard.testing import local_corpus

    src = ctx.artifacts["model_dir"]
    out = ctx.workdir / "tiny-int4"
    cfg = QuantConfig(method="rtn", bits=4, group_size=64, sym=False)
    rep = quantize_model_folder(src, out, cfg, overwrite=True, device=ctx.device, progress=True)
    ctx.artifacts["quantized_dir"] = rep.out_dir
    dtype = torch.float32
    ppl = {}
    for name, path in (("float", src), ("int4", rep.out_dir)):
        folder, model = load_for_eval(path, ctx.device, dtype)
        ids = text_ids(folder.load_tokenizer(), local_corpus().validation_text())
        ppl[name] = sliding_window_perplexity(hf_logits_fn(model), ids, CONTEXT, STRIDE, TOKENS)
    f, q = ppl["float"], ppl["int4"]
    return StageResult("quantize (RTN int4 g64)",
                       f"{rep.source_bytes / 2**20:.1f} -> {rep.quantized_bytes / 2**20:.1f} MiB in {rep.seconds:.0f} s; "
                       f"val ppl {f.perplexity:.1f} -> {q.perplexity:.1f} ({(q.perplexity / f.perplexity - 1) * 100:+.1f}%), "
                       f"{q.protocol()}")
