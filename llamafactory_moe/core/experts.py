"""Batched expert kernels: a fixed number of ops whatever the number of experts.

Experts are stored stacked, so one matmul serves all of them:

* ``A``: ``(E * r, in_features)`` — rows ``[e*r, (e+1)*r)`` are expert ``e``'s down-projection;
* ``B``: ``(out_features, E * r)`` — columns ``[e*r, (e+1)*r)`` are expert ``e``'s up-projection.

Pipeline: stacked A (one GEMM) -> per-expert gate on the ``(N, E, r)`` code (a broadcast multiply) -> stacked B (one
GEMM). Top-k sparsity is a zero gate, not a gather: with ranks of 1-64 the wasted FLOPs are a few percent of the base
GEMM, while gather/scatter dispatch costs many small kernels and copies of ``x``.

Every fast kernel has a ``*_reference`` twin with the same signature, written as the obvious per-expert loop; the
parity tests in ``tests/core`` compare them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paired_experts(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, routing_weights: torch.Tensor,
                   expert_rank: int) -> torch.Tensor:
    """``sum_e w_e * B_e A_e x`` for one-to-one expert pairs.

    Args:
        x: ``(N, in)``; A: ``(E*r, in)``; B: ``(out, E*r)``; routing_weights: ``(N, E)``.
    Returns:
        ``(N, out)``.
    """
    num_tokens = x.shape[0]
    codes = F.linear(x, A)  # (N, E*r)
    num_experts = codes.shape[-1] // expert_rank
    gated = codes.view(num_tokens, num_experts, expert_rank) * routing_weights.to(codes.dtype).unsqueeze(-1)
    return F.linear(gated.view(num_tokens, num_experts * expert_rank), B)


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


def routed_up_projection(code: torch.Tensor, B: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
    """``sum_e w_e * B_e h`` for several up-experts reading one shared code ``h`` (HydraLoRA heads, D2MoRA).

    Args:
        code: ``(N, r)``; B: ``(out, E*r)``; routing_weights: ``(N, E)``.
    Returns:
        ``(N, out)``.
    """
    num_tokens, rank = code.shape
    # Outer product (N, E, 1) * (N, 1, r) -> (N, E*r): each head's block of B sees h scaled by its gate.
    gated = routing_weights.to(code.dtype).unsqueeze(-1) * code.unsqueeze(1)
    return F.linear(gated.reshape(num_tokens, -1), B)


def routed_up_projection_reference(code, B, routing_weights):
    rank = code.shape[-1]
    out = code.new_zeros(code.shape[0], B.shape[0])
    for e in range(routing_weights.shape[-1]):
        cols = slice(e * rank, (e + 1) * rank)
        out = out + routing_weights[:, e:e + 1].to(code.dtype) * (code @ B[:, cols].T)
    return out
