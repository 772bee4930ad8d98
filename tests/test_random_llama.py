"""In-memory random models for the large-model benchmarks: int4 codes without a dense copy, run by the engine."""

from __future__ import annotations

import torch

from onecard.engine import SamplingParams
from onecard.quant import QuantLinear
from onecard.testing.random_llama import in_memory_llm, random_llama


def test_random_int4_llama_generates_through_the_engine():
    model, cfg = random_llama("codellama-34b", "tiny", 4, torch.float32, 96, group_size=32,
                              overrides={"max_position_embeddings": 96})
    assert cfg["max_position_embeddings"] == model.args.max_position_embeddings == 96
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == 4 * model.args.num_layers and all(q.bits == 4 for q in quant)
    assert not any(isinstance(m, torch.nn.Linear) and m is not model.lm_head for m in model.layers.modules())
    llm, streamer = in_memory_llm(model, torch.device("cpu"), 96, max_num_seqs=1)
    out = llm.generate([list(range(3, 40))], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                       use_tqdm=False)
    assert streamer is None and len(out[0].outputs[0].token_ids) == 5
    assert llm.stats()["kv_blocks_used"] == 0
