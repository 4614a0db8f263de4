"""Batched expert kernels: a fixed number of ops whatever the number of experts.

Experts are stored stacked, so one matmul serves all of them:

* ``A``: ``(E * r, in_features)`` — rows ``[e*r, (e+1)*r)`` are expert ``e``'s down-projection;
* ``B``: ``(out_features, E * r)`` — columns ``[e*r, (e+1)*r)`` are expert ``e``'s up-projection.

Pipeline: stacked A (one GEMM) -> per-expert gate on the ``(N, E, r)`` code (a broadcast multiply) -> stacked B (one
GEMM). Top-k sparsity is a zero gate, not a gather: with ranks of 1-64 the wasted FLOPs are a few percent of the base
GEMM, while gather/scatter dispatch costs many small kernels and copies of ``x``.

The adapter scale multiplies the small ``(N, E)`` gates and the base output enters the last GEMM as an addmm residual,
so an update costs no full-size ``(N, out)`` multiply or add. Every fast kernel has a ``*_reference`` twin with the
same signature (without ``scaling`` / ``residual``), written as the obvious per-expert loop; the
parity tests in ``tests/core`` compare them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def paired_experts(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, routing_weights: torch.Tensor,
                   expert_rank: int, scaling: float = 1.0, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + scaling * sum_e w_e * B_e A_e x`` for one-to-one expert pairs (``residual`` None: the sum alone).

    Args:
        x: ``(N, in)``; A: ``(E*r, in)``; B: ``(out, E*r)``; routing_weights: ``(N, E)``; residual: ``(N, out)``.
    Returns:
        ``(N, out)``.
    """
    num_tokens = x.shape[0]
    codes = F.linear(x, A)  # (N, E*r)
    num_experts = codes.shape[-1] // expert_rank
    gates = _scaled(routing_weights.to(codes.dtype), scaling)
    gated = codes.view(num_tokens, num_experts, expert_rank) * gates.unsqueeze(-1)
    return up_projection(gated.view(num_tokens, num_experts * expert_rank), B, residual)


def up_projection(code: torch.Tensor, B: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + code B^T``: the last GEMM of an update, with the residual add inside it (one addmm: no separate add
    kernel and no ``(N, out)`` temporary). ``residual`` None: ``code B^T``."""
    return F.linear(code, B) if residual is None else torch.addmm(residual, code, B.t())


def _scaled(gates: torch.Tensor, scaling: float) -> torch.Tensor:
    # The adapter scale rides on the (N, E) gates, not on the (N, out) output: the same kernel count, a fraction of the
    # memory traffic, forward and backward.
    return gates if scaling == 1.0 else gates * scaling


def paired_experts_reference(x, A, B, routing_weights, expert_rank):
    out = x.new_zeros(x.shape[0], B.shape[0])
    for e in range(routing_weights.shape[-1]):
        rows = slice(e * expert_rank, (e + 1) * expert_rank)
        out = out + routing_weights[:, e:e + 1].to(x.dtype) * (x @ A[rows].T @ B[:, rows].T)
    return out


def mixed_down_projection(x: torch.Tensor, A: torch.Tensor, routing_weights: torch.Tensor,
                          expert_rank: int) -> torch.Tensor:
    """``h = sum_e w_e * A_e x``: several down-experts mixed into one rank-r code (D2MoRA's router 1).

    Args:
        x: ``(N, in)``; A: ``(E*r, in)``; routing_weights: ``(N, E)``.
    Returns:
        ``(N, r)``.
    """
    num_tokens = x.shape[0]
    codes = F.linear(x, A).view(num_tokens, -1, expert_rank)  # (N, E, r)
    # (N, 1, E) @ (N, E, r) -> (N, 1, r): one batched matmul instead of a weighted sum over a Python loop.
    return torch.bmm(routing_weights.to(codes.dtype).unsqueeze(1), codes).squeeze(1)


def mixed_down_projection_reference(x, A, routing_weights, expert_rank):
    out = x.new_zeros(x.shape[0], expert_rank)
    for e in range(routing_weights.shape[-1]):
        rows = slice(e * expert_rank, (e + 1) * expert_rank)
        out = out + routing_weights[:, e:e + 1].to(x.dtype) * (x @ A[rows].T)
    return out


def routed_up_projection(code: torch.Tensor, B: torch.Tensor, routing_weights: torch.Tensor, scaling: float = 1.0,
                         residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + scaling * sum_e w_e * B_e h`` for several up-experts reading one shared code ``h`` (HydraLoRA
    heads, D2MoRA).

    Args:
        code: ``(N, r)``; B: ``(out, E*r)``; routing_weights: ``(N, E)``; residual: ``(N, out)`` or None.
    Returns:
        ``(N, out)``.
    """
    num_tokens, rank = code.shape
    # Outer product (N, E, 1) * (N, 1, r) -> (N, E*r): each head's block of B sees h scaled by its gate.
    gated = _scaled(routing_weights.to(code.dtype), scaling).unsqueeze(-1) * code.unsqueeze(1)
    return up_projection(gated.reshape(num_tokens, -1), B, residual)


def routed_up_projection_reference(code, B, routing_weights):
    rank = code.shape[-1]
    out = code.new_zeros(code.shape[0], B.shape[0])
    for e in range(routing_weights.shape[-1]):
        cols = slice(e * rank, (e + 1) * rank)
        out = out + routing_weights[:, e:e + 1].to(code.dtype) * (code @ B[:, cols].T)
    return out


class _GatherExperts(torch.autograd.Function):
    """``torch.gather(outputs, 1, index)`` whose backward keeps only ``index``: torch's gather saves its whole input
    for backward, which here is every expert's output, ``E / k`` times what the selected nodes need."""

    @staticmethod
    def forward(ctx, outputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.input_shape = outputs.shape
        return torch.gather(outputs, 1, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.input_shape).scatter_add_(1, index, grad), None


def gather_experts(outputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of the expert axis: ``outputs (N, E, d)``, ``index (N, F, d)`` (expanded expert ids) -> ``(N, F, d)``."""
    if not (outputs.requires_grad and torch.is_grad_enabled()):
        return torch.gather(outputs, 1, index)  # nothing is saved without a graph; skip the Function's overhead
    return _GatherExperts.apply(outputs, index)
