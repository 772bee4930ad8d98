"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of
the layer's reconstruction loss ``||XW^T - XQ^T||^2`` (``H = 2 X^T X`` from calibration inputs).

Follows IST-DASLab/gptq's ``fasterquant``: damping (``damp_percent`` x mean diag),
dead inputs zeroed, upper Cholesky factor of ``H^-1``, lazy batch updates over
``block_size`` columns, optional act-order (columns by decreasing ``diag(H)``).
One difference: a group's scale/zero is chosen from the *already updated*
columns of the current block (the reference takes them from the block's
pre-update copy), which is what the error-feedback intends.
"""

from __future__ import annotations

import logging
import math

import torch

from onecard.quant.rtn import QuantizedWeight, check_bits_group, qparams, quantize_codes

log = logging.getLogger(__name__)


class HessianAccumulator:
    """Running ``2/n * sum(x x^T)`` over every token that reaches one linear layer (fp32)."""

    def __init__(self, in_features: int, device: torch.device | str) -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.H.shape[0]).to(self.H.device, torch.float32)
        t = x.shape[0]
        self.H *= self.n / (self.n + t)
        self.n += t
        x = math.sqrt(2 / self.n) * x
        self.H.addmm_(x.t(), x)


def _inverse_cholesky(H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``; raises damping tenfold if H is too ill-conditioned."""
    diag = torch.arange(H.shape[0], device=H.device)
    damp = damp_percent * torch.mean(torch.diag(H))
    for attempt in range(4):
        Hd = H.clone()
        Hd[diag, diag] += damp
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        damp *= 10
        log.warning("Hessian not positive definite; retrying with damping x%d", 10 ** (attempt + 1))
    raise RuntimeError("GPTQ: the Hessian stays singular even with 1000x damping; use more calibration samples")


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool = True,
                  act_order: bool = False, damp_percent: float = 0.01, block_size: int = 128) -> tuple[QuantizedWeight, float]:
    """Quantize ``weight[out, in]`` given the layer's Hessian; returns the weight and GPTQ's loss estimate."""
    check_bits_group(bits, group_size)
    W = weight.detach().to(H.device, torch.float32).clone()
    out_f, in_f = W.shape
    gs = in_f if group_size == -1 else group_size
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_cholesky(H, damp_percent)

    n_groups = (in_f + gs - 1) // gs
    Q = torch.zeros_like(W)
    scales = torch.zeros(n_groups, out_f, device=W.device)
    zeros = torch.zeros(n_groups, out_f, device=W.device)
    losses = torch.zeros(out_f, device=W.device)
    scale = zero = None
    if group_size == -1:
        scale, zero = qparams(W, bits, sym)
        scales[0], zeros[0] = scale, zero
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if group_size != -1 and col % gs == 0:
                scale, zero = qparams(W1[:, i:i + gs], bits, sym)
                scales[col // gs], zeros[col // gs] = scale, zero
            w, d = W1[:, i], Hinv1[i, i]
            q = quantize_codes(w.unsqueeze(1), scale, zero, bits).flatten()
            Q1[:, i] = q
            deq = (q - zero) * scale
            losses += (w - deq) ** 2 / d**2 / 2
            err = (w - deq) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    invperm = torch.argsort(perm)
    g_idx = torch.empty(in_f, dtype=torch.int32, device=W.device)
    g_idx[perm] = (torch.arange(in_f, device=W.device) // gs).to(torch.int32)
    qw = QuantizedWeight(Q[:, invperm].to(torch.uint8), scales.half(), zeros.to(torch.int32), g_idx, bits, group_size)
    return qw, float(losses.sum())
