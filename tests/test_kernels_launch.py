"""Programmatic dependent launch (``kernels/launch.py``): off the GPU it is never used; on a Hopper GPU the decode
kernels give the same bits with and without it, also replayed from one CUDA graph, as the engine runs them."""

from __future__ import annotations

import pytest
import torch

from onecard.engine.config import EngineConfig
from onecard.errors import BadInputError
from onecard.kernels import launch


def test_cpu_tensors_never_use_pdl():
    x = torch.zeros(4)
    for setting in (None, True, False):
        launch.set_programmatic_launch(setting)
        assert not launch.use_pdl(x) and launch.pdl_launch(x) == {"PDL": False}
    launch.set_programmatic_launch(None)


def test_config_checks_the_setting():
    with pytest.raises(BadInputError, match="programmatic_launch"):
        EngineConfig("m", programmatic_launch="yes")


def _off_and_on(run) -> list:
    """``run()`` with PDL off, then on: eager once, once more on a side stream (warm-up), then captured into a CUDA
    graph and replayed; each setting gives ``(eager outputs, graph outputs, run's extra state)``."""
    outs = []
    try:
        for setting in (False, True):
            launch.set_programmatic_launch(setting)
            eager, state = run()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                run(state)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured, _ = run(state)
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            outs.append((eager, captured, state))
    finally:
        launch.set_programmatic_launch(None)
    return outs


@pytest.mark.gpu
def test_decode_kernels_same_bits_with_pdl_on_gpu():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("PDL needs a Hopper-or-later GPU")
    from onecard.kernels.gemv import gemv
    from onecard.kernels.paged_attention import paged_decode_attention_fused
    from onecard.kernels.rmsnorm import add_rmsnorm_triton
    from onecard.kernels.swiglu import silu_mul_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    H, Hkv, D, block, ctx = 8, 2, 128, 16, 300
    hidden = H * D
    w_qkv = torch.randn((H + 2 * Hkv) * D, hidden, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
    w_up = torch.randn(2 * 2048, hidden, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
    w_down = torch.randn(hidden, 2048, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
    norm = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
    res = torch.randn(1, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
    blocks = -(-ctx // block)
    bt = torch.randperm(blocks, device="cuda", generator=g).int().view(1, -1)
    lens = torch.tensor([ctx], device="cuda", dtype=torch.int32)
    pos = lens.long() - 1
    slots = bt[0, (ctx - 1) // block].long().view(1) * block + (ctx - 1) % block
    freqs = torch.outer(torch.arange(ctx, device="cuda").float(),
                        1.0 / 10000 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    cs = torch.cat([freqs.cos(), freqs.sin()], -1)
    cache0 = [torch.randn(blocks, block, Hkv, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2)]

    def step(caches=None):  # one decoder layer's kernels in the engine's order; a fresh cache copy per setting
        caches = caches or [c.clone() for c in cache0]
        h, r = add_rmsnorm_triton(x, res, norm, 1e-5)
        att = paged_decode_attention_fused(gemv(h, w_qkv), pos, cs, *caches, slots, bt, lens, H, Hkv, D, D ** -0.5)
        h2, r2 = add_rmsnorm_triton(att.view(1, hidden), r, norm, 1e-5)
        return (gemv(silu_mul_triton(gemv(h2, w_up)), w_down), r2), caches

    (e0, c0, k0), (e1, c1, k1) = _off_and_on(step)
    for a, b in zip((*e0, *c0, *k0), (*e1, *c1, *k1)):
        assert torch.equal(a, b)
    for a, b in zip(e1, c1):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group_size,M", [(4, 128, 1), (8, -1, 1), (4, 128, 4), (4, 128, 16), (8, -1, 16)])
def test_weight_only_kernels_same_bits_with_pdl_on_gpu(bits, group_size, M):
    """The int4/int8 kernels (gemv with its first tile loaded before the PDL wait, dot, dot_t; split-K, whose last
    program sums the partials) in a chain [add+RMSNorm, up, down] as the engine runs them: same bits with PDL on
    and off, eager and replayed from a CUDA graph."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("PDL needs a Hopper-or-later GPU")
    from onecard.kernels.rmsnorm import add_rmsnorm_triton
    from onecard.kernels.wo_matmul import kernel_for, pick_config, wo_matmul
    from onecard.quant.packing import pack_rows
    from onecard.quant.rtn import rtn_quantize

    torch.manual_seed(0)
    hidden, inter = 4096, 11008

    def packed(n: int, k: int):
        qw = rtn_quantize(torch.randn(n, k) * 0.05, bits, group_size, sym=False)
        return (pack_rows(qw.q.t().contiguous(), bits).cuda(), qw.scales.cuda(), qw.zeros.half().cuda(),
                k if group_size == -1 else group_size)

    up, down = packed(inter, hidden), packed(hidden, inter)
    x = torch.randn(M, hidden, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(M, hidden, device="cuda", dtype=torch.bfloat16)
    norm = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
    assert kernel_for(pick_config(M, bits), bits, x) == pick_config(M, bits).kernel

    def step(_state=None):
        h, r = add_rmsnorm_triton(x, res, norm, 1e-5)
        y = wo_matmul(wo_matmul(h, *up[:3], bits, up[3]), *down[:3], bits, down[3])
        return add_rmsnorm_triton(y, r, norm, 1e-5), None

    (e0, c0, _), (e1, c1, _) = _off_and_on(step)
    for a, b in zip((*e0, *c0, *e1), (*e1, *c1, *c0)):  # PDL off = on, and eager = graph
        assert torch.equal(a, b)
