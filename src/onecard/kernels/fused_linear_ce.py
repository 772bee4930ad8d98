"""Chunked linear + cross-entropy that never materialises the full logits.

Why: a Llama-3 vocabulary of 128k at 2048 tokens makes 1 GiB of bf16 logits,
2 GiB once HF upcasts them to fp32, and as much again for their gradient. We
walk the tokens in chunks: logits of one chunk -> loss and d(logits) in place
(a Triton kernel on CUDA; the same maths in PyTorch elsewhere) -> d(hidden)
and d(weight) for that chunk, then drop the chunk. The gradients are computed
in the forward pass (the loss is the graph's last op, so backward only scales
them), which is what lets the logits die immediately.

Loss semantics match transformers' ``ForCausalLMLoss`` on pre-shifted labels:
mean over non-ignored tokens, or sum / ``num_items_in_batch`` when given.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

IGNORE_INDEX = -100


@triton.jit
def _ce_fwd_grad(LOGITS, LABELS, LOSS, stride_row, V, scale, ignore_index, BLOCK: tl.constexpr):
    """Per row: loss = logsumexp - logit[label]; logits <- (softmax - onehot) * scale, in place."""
    row = tl.program_id(0)
    ptr = LOGITS + row.to(tl.int64) * stride_row
    label = tl.load(LABELS + row)
    if label == ignore_index:
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(ptr + cols, tl.zeros([BLOCK], dtype=tl.float32).to(LOGITS.dtype.element_ty), mask=cols < V)
        tl.store(LOSS + row, 0.0)
    else:
        m = float("-inf")
        s = 0.0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        target = tl.load(ptr + label).to(tl.float32)
        tl.store(LOSS + row, lse - target)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
            tl.store(ptr + cols, (g * scale).to(LOGITS.dtype.element_ty), mask=cols < V)


def _ce_chunk_triton(logits: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """Row losses (fp32); ``logits`` is overwritten with d(loss_sum * scale)/d(logits)."""
    rows, V = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _ce_fwd_grad[(rows,)](logits, labels, loss, logits.stride(0), V, scale, IGNORE_INDEX,
                          BLOCK=min(triton.next_power_of_2(V), 4096), num_warps=8 if logits.is_cuda else 1)
    return loss


def _ce_chunk_torch(logits: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """The same contract as ``_ce_chunk_triton`` in PyTorch (CPU path and reference)."""
    lf = logits.float()
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, 0)
    lse = torch.logsumexp(lf, dim=-1)
    loss = (lse - lf.gather(1, safe[:, None]).squeeze(1)) * valid
    grad = torch.softmax(lf, dim=-1)
    grad[torch.arange(len(safe), device=logits.device), safe] -= 1.0
    grad *= (valid[:, None] * scale)
    logits.copy_(grad)
    return loss


def _chunk_rows(n: int, vocab: int, budget_bytes: int) -> int:
    return max(1, min(n, budget_bytes // (vocab * 4)))


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, num_items, chunk_budget, use_triton):
        n, _ = hidden.shape
        vocab = weight.shape[0]
        n_valid = (labels != IGNORE_INDEX).sum()
        divisor = num_items if num_items is not None else n_valid.clamp(min=1)
        divisor = float(divisor)
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ce = _ce_chunk_triton if use_triton else _ce_chunk_torch
        step = _chunk_rows(n, vocab, chunk_budget)
        for s in range(0, n, step):
            h = hidden[s:s + step]
            logits = h @ weight.t()
            if bias is not None:
                logits = logits + bias
            logits = logits.contiguous()
            total += ce(logits, labels[s:s + step].contiguous(), 1.0 / divisor).sum()
            dlogits = logits.to(h.dtype)  # now holds d(loss)/d(logits)
            if need_h:
                grad_h[s:s + step] = dlogits @ weight.to(h.dtype)
            if need_w:
                grad_w += (dlogits.t() @ h).float()
            if need_b:
                grad_b += dlogits.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dt, w_dt, b_dt = ctx.dtypes
        dh = None if grad_h is None else (grad_h * grad_out.to(grad_h.dtype)).to(h_dt)
        dw = None if grad_w is None else (grad_w * grad_out).to(w_dt)
        db = None if grad_b is None else (grad_b * grad_out).to(b_dt)
        return dh, dw, db, None, None, None, None


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   bias: torch.Tensor | None = None,
                                   num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Unfused PyTorch definition: full fp32 logits, then cross-entropy (what HF does)."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if num_items_in_batch is None:
        return torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / num_items_in_batch


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: torch.Tensor | None = None,
                               num_items_in_batch: int | torch.Tensor | None = None,
                               chunk_budget_bytes: int = 256 * 2**20,
                               use_triton: bool | None = None) -> torch.Tensor:
    """Loss of ``cross_entropy(hidden @ weight.T + bias, labels)`` without the full logits.

    hidden (N, H), weight (V, H), labels (N,) already shifted (-100 = ignore).
    ``chunk_budget_bytes`` bounds one chunk's fp32 logits. ``use_triton``
    defaults to True on CUDA tensors (the CE step runs in Triton); the PyTorch
    chunked path keeps the same memory behaviour on CPU.
    """
    if hidden.dim() != 2 or labels.dim() != 1 or hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"fused_linear_cross_entropy: expected hidden (N,H) and labels (N,), got "
                         f"{tuple(hidden.shape)} and {tuple(labels.shape)}")
    if use_triton is None:
        use_triton = hidden.is_cuda
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = int(num_items_in_batch.item())
    if not torch.is_grad_enabled():
        with torch.no_grad():
            return _FusedLinearCE.forward(_NoGradCtx(), hidden, weight, bias, labels, num_items_in_batch,
                                          chunk_budget_bytes, use_triton)
    return _FusedLinearCE.apply(hidden, weight, bias, labels, num_items_in_batch, chunk_budget_bytes, use_triton)


class _NoGradCtx:
    """Stand-in autograd context for evaluation: no gradient buffers are allocated."""

    needs_input_grad = (False,) * 7

    def save_for_backward(self, *tensors) -> None:
        pass
