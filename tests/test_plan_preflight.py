"""The engine's start-up split predicted before loading, and the engine/trainer preflights that refuse early.

Cards are built by hand (``CardMemory``), never by touching torch.cuda: the
public APIs take ``card_memory=``, and the CLI tests swap the one live-probe
function the preflights call.
"""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from onecard.errors import BadInputError, DoesNotFitError
from onecard.plan import CardMemory, plan_inference, resolve_model
from onecard.plan import memory as M
from onecard.plan.engine_memory import engine_memory
from onecard.plan.preflight import engine_preflight, training_preflight

GIB = 1024**3
MIB = 1024**2


def test_card_memory_budget_is_plan_kv_cache_rule():
    card = CardMemory(total_bytes=24 * GIB, free_bytes=23 * GIB)  # 1 GiB taken by the CUDA context
    assert card.outside_bytes == GIB
    assert card.budget_bytes(0.9) == int(23 * GIB - 0.1 * 24 * GIB)  # free minus the spare 10%: 20.6 GiB
    capped = CardMemory(total_bytes=80 * GIB, free_bytes=79 * GIB, cap_fraction=0.3)  # a 24 GiB process cap on an H100
    assert capped.budget_bytes(0.9) == int(0.3 * 80 * GIB * 0.9)
    with pytest.raises(ValueError):
        CardMemory(total_bytes=GIB, free_bytes=2 * GIB)


def test_engine_split_llama3_8b_on_24gib_by_hand():
    """Every term by hand: Llama-3-8B bf16, 24 GiB card with 23 GiB free, util 0.9, 256 seqs, 8192-token prefill."""
    spec = resolve_model("llama-3-8b")
    card = CardMemory(total_bytes=24 * GIB, free_bytes=23 * GIB)
    eng = engine_memory(spec, "bf16", card, 0.9, max_num_seqs=256, max_num_batched_tokens=8192)
    h, i, V = 4096, 14336, 128256
    # activation peak: 8192 tokens x (residual + hidden 4h bytes + SwiGLU's 4 x 2i) + 256 sampled rows x 22 B + 64 MiB
    assert eng.activation_bytes == 8192 * (4 * h + 8 * i) + 256 * V * 22 + 64 * MIB
    # graphs for batch 1, 2, 4, 8, 16, 32, ..., 256 keep their logits; the pool (activations, and the attention's
    # fp32 partials of up to 4 partitions per row) and sampler sized for 256 rows
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16))
    assert eng.workspace_bytes == sum(sizes) * V * 2 + 256 * h * (16 * 2 + 4 * 4) + 256 * V * 12
    assert eng.block_bytes == 16 * 2 * 32 * 8 * 128 * 2  # 16 tokens x K,V x 32 layers x 8 kv heads x 128 x bf16 = 2 MiB
    budget = int(23 * GIB - 0.1 * 24 * GIB)
    left = budget - M.reserved_bytes(M.weight_tensors(spec, "bf16")) - eng.activation_bytes - eng.workspace_bytes \
        - 384 * MIB
    assert eng.kv_blocks == left // eng.block_bytes and eng.kv_tokens == 16 * eng.kv_blocks
    # what the engine holds once running: the card's 90% less the free headroom, within one block
    assert abs(eng.reserved_bytes - (GIB + budget - 384 * MIB)) <= eng.block_bytes


@pytest.mark.parametrize("max_model_len", [1024, 4096])
def test_plan_fits_iff_engine_preflight_passes(max_model_len):
    """The planner's 'fits' and the engine's refusal use one rule: for one sequence they agree at the boundary."""
    spec = resolve_model("llama-2-13b")
    ctx = 0.6
    for util in (0.80, 0.85, 0.90, 0.95):
        plan = plan_inference(spec, "4090", bits=16 if util > 0.9 else 8, max_model_len=max_model_len,
                              gpu_memory_utilization=util, cuda_context_gib=ctx)
        card = CardMemory.for_card(24, int(ctx * GIB), "4090")
        fmt_q = None if plan.bits == 16 else "int8"
        try:
            engine_preflight(spec, card, max_model_len=max_model_len, default_max_model_len=4096, max_num_seqs=1,
                             max_num_batched_tokens=8192, gpu_memory_utilization=util, quantization=fmt_q)
            ok = True
        except DoesNotFitError:
            ok = False
        assert ok == plan.fits, (util, plan.total_gib)
        if plan.fits:
            assert plan.engine_kv_tokens >= max_model_len
            block_gib = M.kv_bytes_per_token(spec) * 16 / GIB  # the pool is whole blocks, plus one scratch block
            assert plan.engine_reserved_gib == pytest.approx(24 * util - 384 / 1024, abs=block_gib)


def test_engine_refusal_names_need_budget_and_options_that_fit():
    card = CardMemory(total_bytes=24 * GIB, free_bytes=23 * GIB, name="fake 4090")
    kw = dict(default_max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=8192, gpu_memory_utilization=0.9)
    with pytest.raises(DoesNotFitError) as err:
        engine_preflight("llama-2-13b", card, max_model_len=4096, **kw)
    msg = str(err.value)
    assert "\n" not in msg and "max_model_len=4096 does not fit on fake 4090: needs " in msg
    assert "GiB, 20.6 GiB available" in msg and "quantization='rtn-int4'" in msg
    assert engine_preflight("llama-2-13b", card, max_model_len=4096, quantization="rtn-int4", **kw).max_model_len == 4096
    # Llama-3-8B bf16 at 0.8: the KV pool holds less than 8,192 tokens; the offered max_model_len passes
    with pytest.raises(DoesNotFitError) as err:
        engine_preflight("llama-3-8b", card, max_model_len=8192, **{**kw, "gpu_memory_utilization": 0.8})
    opt = [o for o in str(err.value).split("options: ")[1].split("; ") if o.startswith("max_model_len=")]
    n = int(opt[0].split("=")[1])
    assert 256 <= n < 8192 and n % 16 == 0
    assert engine_preflight("llama-3-8b", card, max_model_len=n, **{**kw, "gpu_memory_utilization": 0.8}).max_model_len == n


def test_engine_refusal_offers_fewer_sequences():
    """256 sampled rows of a 152k vocabulary (and their CUDA graphs) cost GiBs: fewer max_num_seqs can be the fix."""
    spec = resolve_model("qwen2-7b")
    card = CardMemory(total_bytes=24 * GIB, free_bytes=23 * GIB)
    kw = dict(max_model_len=None, default_max_model_len=8192, max_num_batched_tokens=8192, gpu_memory_utilization=0.76)
    one = engine_preflight(spec, card, max_num_seqs=1, **kw)
    assert not one.picked and one.max_model_len == 8192
    with pytest.raises(DoesNotFitError, match=r"options: .*max_num_seqs=\d+"):
        engine_preflight(spec, card, max_num_seqs=256, **{**kw, "max_model_len": 8192})


def _tiny_card(tiny_path, blocks: int, util: float = 0.9) -> CardMemory:
    """A card whose engine KV pool holds exactly ``blocks`` blocks for the tiny model (fp32 on CPU, 256 seqs)."""
    spec = resolve_model(tiny_path)
    big = engine_memory(spec, "fp32", CardMemory(64 * GIB, 64 * GIB), util, 256, 8192, kv_cache_dtype="fp32")
    total = math.ceil((big.fixed_bytes + blocks * big.block_bytes + big.block_bytes // 2) / util)
    return CardMemory(total, total, name="tiny card")


def test_llm_picks_default_max_model_len_from_the_plan(tiny_model):
    from onecard.engine import LLM

    card = _tiny_card(tiny_model.path, blocks=32)  # 512 tokens of KV; the model's default is 1,024
    llm = LLM(str(tiny_model.path), device="cpu", card_memory=card)
    assert llm.config.max_model_len == 512
    big = LLM(str(tiny_model.path), device="cpu", card_memory=_tiny_card(tiny_model.path, blocks=200))
    assert big.config.max_model_len == 1024  # the default fits: kept


def test_llm_refuses_before_loading(tiny_model, monkeypatch):
    from onecard.engine import LLM
    from onecard.models import loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("weights loaded before the preflight"))
    with pytest.raises(DoesNotFitError, match=r"max_model_len=1024 does not fit on tiny card: .*options: max_model_len=512"):
        LLM(str(tiny_model.path), device="cpu", max_model_len=1024, card_memory=_tiny_card(tiny_model.path, blocks=32))


def _cli(*args):
    from onecard.cli import app

    return CliRunner().invoke(app, list(args))


def test_generate_cli_refuses_with_one_line(tiny_model, monkeypatch):
    from onecard.plan import card_memory

    monkeypatch.setattr(card_memory, "live_card_memory", lambda device=None: _tiny_card(tiny_model.path, blocks=8))
    r = _cli("generate", str(tiny_model.path), "hello", "--device", "cpu", "--max-tokens", "2")
    assert isinstance(r.exception, DoesNotFitError), r.output  # onecard's main() prints it as one line, exit code 2
    assert "max_model_len=1024 does not fit on tiny card: needs " in str(r.exception)


def test_training_preflight_refuses_with_train_flags():
    card = CardMemory(total_bytes=24 * GIB, free_bytes=23 * GIB, name="fake 4090")
    kw = dict(grad_accum=1, gradient_checkpointing=True, optimizer="adamw_torch", fused_ce=True, lora_rank=16,
              lora_targets="all-linear")
    with pytest.raises(DoesNotFitError) as err:
        training_preflight("llama-2-7b", card, method="full", seq_len=2048, batch_size=1, **kw)
    msg = str(err.value)
    assert msg.startswith("llama-2-7b full training (batch 1 x 2048 tokens) does not fit: needs ")
    assert "fake 4090 has 22.8 usable" in msg and "--method qlora (needs" in msg and "\n" not in msg
    plan = training_preflight("llama-2-7b", card, method="qlora", seq_len=2048, batch_size=1, **kw)
    assert plan.fits and plan.card == "fake 4090" and plan.tokens_per_s is None  # not a catalog name: no roofline


def test_train_cli_refuses_before_loading(tiny_model, tmp_path, monkeypatch):
    from onecard.plan import card_memory
    from onecard.train import trainer

    data = tmp_path / "data.txt"
    data.write_text("hello world. " * 200)
    small = CardMemory(total_bytes=GIB, free_bytes=GIB - 64 * MIB, name="tiny card")
    monkeypatch.setattr(card_memory, "live_card_memory", lambda device=None: small)
    monkeypatch.setattr(trainer, "load_tokenizer", lambda path: pytest.fail("loaded before the preflight"))
    r = _cli("train", str(tiny_model.path), "--data", str(data), "--method", "full", "--batch-size", "64",
             "--seq-len", "1024", "--precision", "bf16", "--device", "cpu", "--out", str(tmp_path / "run"))
    assert isinstance(r.exception, DoesNotFitError), r.output
    msg = str(r.exception)
    assert "full training (batch 64 x 1024 tokens) does not fit" in msg and "--batch-size 1" in msg


def test_plan_cli_json_and_table_agree():
    r = _cli("plan", "llama-3-8b", "--card", "4090", "--ctx", "8192", "--json")
    data = json.loads(r.output)
    assert data["runtime"] == "engine" and data["engine_kv_tokens"] >= 8192 and data["fits"]
    parts = data["weights_gib"] + data["kv_gib"] + data["activations_gib"] + data["workspace_gib"] + data["overhead_gib"]
    assert parts == pytest.approx(data["total_gib"])
    t = _cli("plan", "llama-3-8b", "--card", "4090", "--ctx", "8192")
    assert t.exit_code == 0
    for key in ("total_gib", "engine_reserved_gib", "engine_kv_gib", "weights_gib"):
        assert f"{data[key]:.2f}" in t.output
    assert f"{data['engine_kv_tokens']:,} tokens" in t.output


def test_speculation_widens_the_graph_workspace_the_preflight_counts():
    """Verify steps replay the decode graphs with (1 + k) rows per sequence: the preflight sizes them as the
    engine captures them (``graph_rows``), so the KV pool it promises is the one start-up will find."""
    from onecard.engine.model_runner import cuda_graph_workspace_bytes, graph_batch_sizes

    spec = resolve_model("llama-3-8b")
    card = CardMemory(total_bytes=24 * GIB, free_bytes=23 * GIB, name="fake 4090")
    plain, spec4 = (engine_memory(spec, "bf16", card, 0.9, 16, 8192, num_speculative_tokens=k) for k in (0, 4))
    a = spec.args
    assert spec4.workspace_bytes - plain.workspace_bytes == (
        cuda_graph_workspace_bytes(graph_batch_sizes(80), a.vocab_size, a.hidden_size, 2)
        - cuda_graph_workspace_bytes(graph_batch_sizes(16), a.vocab_size, a.hidden_size, 2)) > 0
    assert spec4.kv_blocks < plain.kv_blocks


def test_a_draft_model_is_counted_as_the_engine_holds_it():
    """speculative_model: its weights, a KV block of its own beside each of the target's, and its decode graphs;
    a context that fits the target alone can stop fitting with the draft, and the refusal says so before loading."""
    from onecard.engine.model_runner import cuda_graph_workspace_bytes, graph_batch_sizes, graph_rows

    target, draft = resolve_model("qwen2-7b"), resolve_model("qwen2-0.5b")
    card = CardMemory(total_bytes=24 * GIB, free_bytes=23 * GIB, name="fake 4090")
    alone, both = (engine_memory(target, "bf16", card, 0.9, 16, 8192, num_speculative_tokens=4, draft=d)
                   for d in (None, draft))
    assert both.weights_bytes - alone.weights_bytes == M.reserved_bytes(M.weight_tensors(draft, "bf16"))
    assert both.block_bytes - alone.block_bytes == M.kv_bytes_per_token(draft, "auto") * 16
    d = draft.args
    assert both.workspace_bytes - alone.workspace_bytes == cuda_graph_workspace_bytes(
        graph_batch_sizes(graph_rows(16, 4, 256)), d.vocab_size, d.hidden_size, 2)
    assert both.kv_tokens < alone.kv_tokens
    kw = {"max_num_seqs": 16, "max_num_batched_tokens": 8192, "gpu_memory_utilization": 0.9,
          "num_speculative_tokens": 4}
    fits_alone = alone.kv_tokens - alone.kv_tokens % 16
    assert engine_preflight("qwen2-7b", card, max_model_len=fits_alone, default_max_model_len=8192, **kw)
    with pytest.raises(DoesNotFitError, match=f"max_model_len={fits_alone} does not fit"):
        engine_preflight("qwen2-7b", card, max_model_len=fits_alone, default_max_model_len=8192,
                         draft_model="qwen2-0.5b", **kw)


def test_a_quantized_engine_sets_aside_its_dequantized_scratch_weight():
    """From ``dequant_min_rows`` rows, ``wo_matmul`` dequantizes the weight into a scratch buffer: the prefill
    profile needs the largest one (gate/up, fused), and so does the pool of every decode graph captured at that
    many rows (65 for int4 g128, whose ``dot_t`` runs up to 64; 32 where tiles span groups). The planner counts
    both with the shapes the engine's quantized model really has."""
    import torch

    from onecard.engine.model_runner import cuda_graph_workspace_bytes, dequantized_shapes, graph_batch_sizes
    from onecard.kernels import wo_matmul
    from onecard.plan.engine_memory import _dequantized_shapes
    from onecard.plan.spec import ModelSpec
    from onecard.testing.random_llama import random_llama

    model, _ = random_llama("llama-2-7b", "tiny", 4, torch.float32, 64)
    assert set(dequantized_shapes(model)) == set(_dequantized_shapes(ModelSpec("tiny", model.args), "int4"))
    assert dequantized_shapes(random_llama("llama-2-7b", "tiny", None, torch.float32, 64)[0]) == []

    assert wo_matmul.dequant_min_rows(4, 128, 4096) == wo_matmul.DEQUANT_GEMM_MIN_M == 65
    assert wo_matmul.dequant_min_rows(4, 32, 4096) == wo_matmul.DEQUANT_GEMM_MIN_M_ROWWISE == 32
    assert wo_matmul.dequant_min_rows(8, 4096, 4096) == 65

    spec = resolve_model("llama-2-7b")
    a = spec.args
    gate_up = a.hidden_size * 2 * a.intermediate_size * 2
    card = CardMemory(total_bytes=24 * GIB, free_bytes=23 * GIB, name="fake 4090")
    bf16, int4, at64 = (engine_memory(spec, fmt, card, 0.9, seqs, 8192) for fmt, seqs in
                        (("bf16", 128), ("int4", 128), ("int4", 64)))
    graphs = cuda_graph_workspace_bytes(graph_batch_sizes(128), a.vocab_size, a.hidden_size, 2)
    assert bf16.workspace_bytes == graphs and int4.workspace_bytes == graphs + gate_up
    assert at64.workspace_bytes == cuda_graph_workspace_bytes(graph_batch_sizes(64), a.vocab_size, a.hidden_size, 2)
    assert int4.activation_bytes - bf16.activation_bytes == gate_up  # the 8192-token prefill profile


def test_fp8_quantization_is_planned_as_one_byte_weights():
    """quantization='fp8' holds e4m3 codes (1 byte a weight) plus an fp32 scale per output channel, and no
    dequantized scratch: the preflight plans exactly that, and refuses an unknown name with the choices."""
    from onecard.plan.preflight import engine_weight_format

    spec = resolve_model("llama-3-8b")
    assert engine_weight_format(spec, "fp8", 2) == "fp8" and engine_weight_format(spec, "int8", 2) == "int8"
    with pytest.raises(BadInputError, match="'fp8'"):
        engine_weight_format(spec, "fp4", 2)
    card = CardMemory(total_bytes=24 * GIB, free_bytes=23 * GIB, name="fake 4090")
    bf16, fp8 = (engine_memory(spec, fmt, card, 0.9, 64, 8192) for fmt in ("bf16", "fp8"))
    linears = sum(o * i for _, o, i in spec.linear_shapes()) * spec.args.num_layers
    assert bf16.weights_bytes - fp8.weights_bytes == pytest.approx(linears, rel=0.01)
    assert fp8.workspace_bytes == bf16.workspace_bytes and fp8.kv_blocks > bf16.kv_blocks
