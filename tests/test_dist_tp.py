"""Tensor parallelism on CPU: 2 gloo processes give the single-process logits (prefill and paged decode), for bf16-layout
models and for quantized ones (int8, RTN int4, GPTQ and AWQ folders), which are quantized first and then sliced."""

from __future__ import annotations

import pytest
import torch

from onecard.dist.launch import spawn
from onecard.errors import BadInputError, NotBuiltYetError
from onecard.models import ModelArgs, arch_config, open_model_folder, scale_config
from onecard.models.llama import AttentionMetadata
from onecard.models.loader import build_model, load_model
from onecard.testing import make_random_checkpoint

BLOCK, N_DECODE = 8, 4


def prefill_then_decode(model, ids: torch.Tensor, kv_heads: int, fused_prefill: bool = False) -> torch.Tensor:
    """Logits of a prefill over ``ids`` then N_DECODE greedy steps through a paged cache: [T + N_DECODE, vocab].
    ``fused_prefill``: the prefill's RoPE + cache write through the Triton kernel (the engine's CUDA path)."""
    a = model.args
    T = ids.numel()
    blocks = (T + N_DECODE + BLOCK - 1) // BLOCK
    for layer in model.layers:
        layer.self_attn.k_cache = torch.zeros(blocks, BLOCK, kv_heads, a.head_dim)
        layer.self_attn.v_cache = torch.zeros(blocks, BLOCK, kv_heads, a.head_dim)
    table = torch.arange(blocks, dtype=torch.int32)[None]
    with torch.no_grad():
        meta = AttentionMetadata(is_prefill=True, slot_mapping=torch.arange(T), seq_lens=[T],
                                 fused_rope_store=fused_prefill)
        logits = [model.compute_logits(model(ids, torch.arange(T), meta))]
        for i in range(N_DECODE):
            pos = torch.tensor([T + i])
            tok = logits[-1][-1:].argmax(-1)
            meta = AttentionMetadata(is_prefill=False, slot_mapping=pos, context_lens=pos + 1, block_tables=table)
            logits.append(model.compute_logits(model(tok, pos, meta)))
    return torch.cat(logits)


def load_case(folder: str, quant: str | None):
    """The single-GPU model of a case: dense, RTN-quantized on the fly (``quant``), or a GPTQ/AWQ folder."""
    from onecard.quant import load_quantized_model, load_rtn_model

    f = open_model_folder(folder)
    if f.quantization_config:
        return load_quantized_model(f, torch.float32, "cpu")
    if quant:
        return load_rtn_model(f, quant, torch.float32, "cpu")
    return load_model(f, torch.float32, "cpu")


class ReferenceSumAddNorm:
    """``dist.tp.SumAddNorm``'s contract on gloo: the all-reduce, then add + RMSNorm in PyTorch; records the slots."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows, self.slots = max_rows, []

    def takes(self, x: torch.Tensor) -> bool:
        return x.dim() == 2 and x.shape[0] <= self.max_rows

    def __call__(self, x, residual, weight, eps, slot):
        import torch.distributed as dist

        from onecard.kernels.rmsnorm import add_rmsnorm_reference

        self.slots.append(slot)
        total = x.clone()
        dist.all_reduce(total)
        return add_rmsnorm_reference(total, residual, weight, eps)


def _tp_worker(cases: list[tuple[str, str | None, torch.Tensor]], out: str) -> None:
    import torch.distributed as dist

    from onecard.dist.launch import init_distributed
    from onecard.dist.tp import (
        fuse_sums_into_norms_,
        local_kv_heads,
        shard_model_,
        use_symm_mem_all_reduce_,
    )

    env, _ = init_distributed("cpu")
    results = []
    for folder, quant, ids in cases:  # every case in one spawn: starting processes is the slow part on CI
        model = load_case(folder, quant)
        kv_heads = local_kv_heads(model.args, env.world_size)
        shard_model_(model, env.rank, env.world_size)
        assert not use_symm_mem_all_reduce_(model)  # CPU: every sum stays on the process group (gloo here)
        assert model.args.num_kv_heads == kv_heads and model.full_args.num_kv_heads >= kv_heads
        logits = prefill_then_decode(model, ids, model.args.num_kv_heads)
        fused = None
        if quant is None:  # the same model with each sum finished in the next norm, for decode rows (not prefill)
            fused = ReferenceSumAddNorm(max_rows=1)
            fuse_sums_into_norms_(model, fused)
            fused = {"logits": prefill_then_decode(model, ids, model.args.num_kv_heads), "slots": fused.slots}
        layer = model.layers[0]
        qkv, down = layer.self_attn.qkv_proj, layer.mlp.down_proj.linear
        results.append({"logits": logits, "fused": fused, "shapes": [(qkv.out_features, qkv.in_features),
                                                     (down.out_features, down.in_features)],
                        "types": [type(qkv).__name__, type(down).__name__]})
    dist.barrier()
    if env.rank == 0:
        torch.save(results, out)


CASES = [
    ("llama-2-7b", None, None),                               # MHA: 4 heads, 4 kv heads -> 2 + 2 per rank
    ("llama-3.1-8b", {"num_key_value_heads": 2}, None),       # GQA, kv heads sharded (llama3 rope scaling)
    ("llama-3.1-8b", None, None),                             # GQA with 1 kv head: replicated on both ranks
    ("qwen2-7b", None, None),                                 # qkv bias
    ("llama-2-7b", None, "int8"),                             # per-channel int8: row slices share each row's scale
    ("llama-3.1-8b", {"num_key_value_heads": 2}, "rtn-int4-g32"),  # int4 groups of 32, kv heads sharded
    ("qwen2-7b", None, "gptq"),                               # GPTQ folder (RTN 4-bit g32 in GPTQ layout), qkv bias
    ("llama-2-7b", None, "awq"),                              # AWQ GEMM folder, g32
    ("llama-3.1-8b", {"num_key_value_heads": 2}, "fp8"),      # fp8: row-parallel halves scale their own half
]
FOLDER_METHODS = {"gptq": "rtn", "awq": "awq"}  # the case's folder format -> the `onecard quantize` method writing it


def _case_folder(arch: str, overrides: dict | None, quant: str | None, tmp) -> tuple[str, str | None]:
    folder = make_random_checkpoint(arch, "tiny", overrides=overrides)
    if quant not in FOLDER_METHODS:
        return str(folder), quant
    from onecard.quant import QuantConfig, quantize_model_folder

    out = tmp.mktemp(quant) / "q"
    quantize_model_folder(folder, out, QuantConfig(FOLDER_METHODS[quant], 4, 32, nsamples=2, seqlen=32),
                          progress=False)
    return str(out), None


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    """(single-process model, reference logits, TP=2 result) per case; one 2-process spawn for all of them."""
    refs, cases = [], []
    for arch, overrides, quant in CASES:
        folder, rtn = _case_folder(arch, overrides, quant, tmp_path_factory)
        model = load_case(folder, rtn)
        ids = torch.randint(3, model.args.vocab_size, (11,), generator=torch.Generator().manual_seed(0))
        refs.append((model, prefill_then_decode(model, ids, model.args.num_kv_heads)))
        cases.append((folder, rtn, ids))
    out = tmp_path_factory.mktemp("tp") / "tp.pt"
    spawn(_tp_worker, 2, (cases, str(out)), timeout_s=480)
    return [(m, r, g) for (m, r), g in zip(refs, torch.load(out))]


@pytest.mark.parametrize("case", range(len(CASES)),
                         ids=[a + ("-kv2" if o else "") + (f"-{q}" if q else "") for a, o, q in CASES])
def test_tp2_equals_single_process(case, tp_runs):
    model, ref, got = tp_runs[case]
    a = model.args
    kv_local = max(1, a.num_kv_heads // 2)
    assert got["shapes"][0] == ((a.q_size // 2) + 2 * kv_local * a.head_dim, a.hidden_size)
    assert got["shapes"][1] == (a.hidden_size, a.intermediate_size // 2)
    quant = CASES[case][2]
    assert got["types"] == [{None: "Linear", "fp8": "Fp8Linear"}.get(quant, "QuantLinear")] * 2
    assert got["logits"].shape == ref.shape
    if quant == "fp8":  # each rank quantizes its half of a token with its own scale: close, not equal
        arch, overrides, _ = CASES[case]
        dense = load_case(str(make_random_checkpoint(arch, "tiny", overrides=overrides)), None)
        ids = torch.randint(3, a.vocab_size, (11,), generator=torch.Generator().manual_seed(0))  # tp_runs' prompt
        T = ids.numel()  # prefill rows only: decode feeds each model its own greedy tokens
        rel = lambda x, y: ((x[:T] - y[:T]).norm() / y[:T].norm()).item()  # noqa: E731
        exact = prefill_then_decode(dense, ids, a.num_kv_heads)
        # TP=2 fp8 is as close to the float model as one-GPU fp8 is (its own quantization noise, not a wrong slice)
        assert rel(got["logits"], exact) < 1.25 * rel(ref, exact), (rel(got["logits"], exact), rel(ref, exact))
        return
    assert (got["logits"] - ref).abs().max().item() < 1e-5
    assert torch.equal(got["logits"].argmax(-1), ref.argmax(-1))
    if got["fused"] is not None:  # sums deferred to the norms: same logits; slots alternate 0, 1 by call site
        assert (got["fused"]["logits"] - ref).abs().max().item() < 1e-5
        assert got["fused"]["slots"] == [0, 1] * a.num_layers * N_DECODE


def test_shard_on_meta_and_bad_sizes():
    args = ModelArgs.from_hf_config(scale_config(arch_config("llama-2-7b"), "tiny"))
    from onecard.dist.tp import check_tp, shard_model_

    model = build_model(args, torch.float32, "meta")
    shard_model_(model, 1, 4)
    attn = model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads, attn.qkv_proj.weight.shape[0]) == (1, 1, 3 * args.head_dim)
    with pytest.raises(BadInputError, match="attention heads"):
        check_tp(args, 3)
    with pytest.raises(BadInputError, match="rank 2 is outside"):
        shard_model_(build_model(args, torch.float32, "meta"), 2, 2)
    quant = build_model(args, torch.float32, "meta")
    quant.layers[0].mlp.down_proj = torch.nn.Identity()
    with pytest.raises(NotBuiltYetError, match="Identity"):
        shard_model_(quant, 0, 2)


def test_row_parallel_sends_sums_that_fit_to_symmetric_memory():
    from onecard.dist.tp import (
        RowParallelLinear,
        SymmMemAllReduce,
        symm_mem_unavailable,
    )

    fast = object.__new__(SymmMemAllReduce)  # the buffer without its CUDA rendezvous: what fits() reads
    fast.buffer = torch.empty(64, dtype=torch.bfloat16)
    assert fast.fits(torch.ones(2, 16, dtype=torch.bfloat16))
    assert not fast.fits(torch.ones(2, 16))  # another dtype than the buffer's
    assert not fast.fits(torch.ones(4, 32, dtype=torch.bfloat16))  # larger than the buffer
    assert not fast.fits(torch.ones(1, 3, dtype=torch.bfloat16))  # 6 bytes: the kernels move 16-byte vectors
    assert not fast.fits(torch.ones(16, 2, dtype=torch.bfloat16).t())  # not contiguous

    class Doubling:  # stands in for the two-rank sum of equal partials
        def fits(self, x):
            return x.shape[0] == 1

        def __call__(self, x):
            return x * 2

    lin = torch.nn.Linear(4, 4, bias=False)
    row = RowParallelLinear(lin, None)
    row.fast = Doubling()
    x = torch.randn(1, 4)
    torch.testing.assert_close(row(x), lin(x) * 2)
    with pytest.raises(ValueError, match="Default process group"):  # does not fit: the NCCL/gloo path is taken
        row(torch.randn(2, 4))
    assert "CUDA only" in symm_mem_unavailable(torch.device("cpu"), 2)


def _sum_norm_worker(out: str) -> None:
    """Rank r: ``SumAddNorm`` against NCCL's all-reduce + the add+norm kernel, eagerly and replayed in a CUDA graph
    (the flags must reset themselves), in bf16 and fp32; both ranks must end with the same bits."""
    import torch.distributed as dist

    from onecard.dist.launch import init_distributed
    from onecard.dist.tp import FUSED_MAX_ROWS, SumAddNorm
    from onecard.kernels.rmsnorm import add_rmsnorm_triton

    env, device = init_distributed("cuda")
    report = {"max_diff": 0.0, "calls": 0, "ranks_agree": True}

    def check(fused, x, residual, w, slot):
        y, s = fused(x, residual, w, 1e-5, slot)
        total = x.clone()
        dist.all_reduce(total)
        y_ref, s_ref = add_rmsnorm_triton(total, residual, w, 1e-5)
        diff = max((y.float() - y_ref.float()).abs().max().item(), (s.float() - s_ref.float()).abs().max().item())
        report["max_diff"] = max(report["max_diff"], diff / max(1.0, y_ref.float().abs().max().item()))
        both = [torch.empty_like(y) for _ in range(env.world_size)]
        dist.all_gather(both, y)
        report["ranks_agree"] &= all(torch.equal(both[0], b) for b in both)
        report["calls"] += 1

    for dtype, hidden in ((torch.bfloat16, 5120), (torch.float32, 4096)):
        fused = SumAddNorm(dist.group.WORLD, torch.device(device), dtype, hidden, max_rows=FUSED_MAX_ROWS)
        for trial in range(40):  # rows vary up to the engine's limit: every row's flags are used, in both slots
            g = torch.Generator(device=device).manual_seed(1000 * trial + env.rank)
            shared = torch.Generator(device=device).manual_seed(trial)
            rows = 1 + trial * 7 % FUSED_MAX_ROWS
            x = torch.randn(rows, hidden, device=device, dtype=dtype, generator=g)
            residual = torch.randn(rows, hidden, device=device, dtype=dtype, generator=shared)
            w = torch.rand(hidden, device=device, dtype=dtype, generator=shared) + 0.5
            check(fused, x, residual, w, trial % 2)
        x = torch.zeros(2, hidden, device=device, dtype=dtype)
        residual, w = torch.ones_like(x), torch.ones(hidden, device=device, dtype=dtype)
        fused(x, residual, w, 1e-5, 0)  # warm-up: compile before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [fused(x, residual, w, 1e-5, slot) for slot in (0, 1, 0, 1)]
        for replay in range(10):
            x.copy_(torch.randn(x.shape, device=device, generator=torch.Generator(device=device).manual_seed(
                replay * 7 + env.rank)).to(dtype))
            graph.replay()
            total = x.clone()
            dist.all_reduce(total)
            y_ref, _ = add_rmsnorm_triton(total, residual, w, 1e-5)
            for y, _s in outs:
                report["max_diff"] = max(report["max_diff"], (y.float() - y_ref.float()).abs().max().item())
            report["calls"] += len(outs)

    # the row-parallel GEMV pushing its partial into every rank's buffer (RowParallelLinear._partial): a graph of
    # [GEMV -> sum] x 4 with the slots alternating, as a decode step chains them (PDL): no rank may overwrite a
    # slot while its peer still reads it
    from onecard.kernels.gemv import gemv

    fused = SumAddNorm(dist.group.WORLD, torch.device(device), torch.bfloat16, 5120, max_rows=8)
    g = torch.Generator(device=device).manual_seed(env.rank)
    ws = [torch.randn(5120, 2560, device=device, generator=g).to(torch.bfloat16) * 0.05 for _ in range(4)]
    a = torch.zeros(1, 2560, device=device, dtype=torch.bfloat16)
    residual, w = torch.ones(1, 5120, device=device, dtype=torch.bfloat16), torch.ones(5120, device=device,
                                                                                       dtype=torch.bfloat16)

    def step():
        ys = []
        for i, wi in enumerate(ws):
            own, pushes = fused.push_targets(1, i % 2)
            part = gemv(a, wi, out=own, copies=pushes)
            report["in_buffer"] &= part.data_ptr() == own.data_ptr()
            ys.append(fused(part, residual, w, 1e-5, i % 2)[0])
        return ys

    report["in_buffer"] = True
    step()  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ys = step()
    for replay in range(10):
        a.copy_(torch.randn(a.shape, device=device, generator=torch.Generator(device=device).manual_seed(
            replay)).to(torch.bfloat16))
        graph.replay()
        for wi, y in zip(ws, ys):
            total = gemv(a, wi)
            dist.all_reduce(total)
            y_ref, _ = add_rmsnorm_triton(total, residual, w, 1e-5)
            report["max_diff"] = max(report["max_diff"], (y.float() - y_ref.float()).abs().max().item())
        report["calls"] += len(ys)
    torch.cuda.synchronize()
    dist.barrier()
    if env.rank == 0:
        torch.save(report, out)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_sum_add_rmsnorm_kernel_matches_all_reduce_then_norm(tmp_path):
    from onecard.dist.tp import symm_mem_unavailable

    if symm_mem_unavailable(torch.device("cuda", 0), 2):
        pytest.skip(symm_mem_unavailable(torch.device("cuda", 0), 2))
    out = tmp_path / "sum_norm.pt"
    spawn(_sum_norm_worker, 2, (str(out),), timeout_s=300)
    r = torch.load(out)
    assert r["calls"] == 2 * (40 + 40) + 40 and r["ranks_agree"] and r["in_buffer"]
    assert r["max_diff"] < 2e-2  # bf16: one rounding step of the sum may differ from NCCL's
