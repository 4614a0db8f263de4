"""Routers and balance losses shared by the methods: pure functions on ``[num_tokens, num_experts]`` tensors.

Conventions (Mixtral's names): ``router_logits`` are pre-normalisation scores, ``router_probs`` their softmax (always
float32: a bf16 softmax over experts loses the small differences routing depends on), ``routing_weights`` the dense
``[N, E]`` gate actually applied (zero for experts a token does not use) and ``selected`` the bool mask of used
experts. Sparse top-k is represented densely so the expert kernels need no gather/scatter and no Python loop.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import aux_loss


def softmax_top_k(router_logits: torch.Tensor, top_k: Optional[int], renormalize: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax over experts, keep the top-k per token, optionally renormalise the kept probabilities.

    Args:
        router_logits: ``(N, E)``.
        top_k: experts per token; ``None`` or ``E`` keeps all (soft routing).
    Returns:
        ``(routing_weights (N, E) fp32, router_probs (N, E) fp32, selected (N, E) bool)``.
    """
    router_probs = torch.softmax(router_logits.float(), dim=-1)
    num_experts = router_probs.shape[-1]
    if top_k is None or top_k >= num_experts:
        selected = torch.ones_like(router_probs, dtype=torch.bool)
        return router_probs, router_probs, selected
    # A stable descending sort breaks ties by expert index on every device (torch.topk's tie order is unspecified),
    # so routing of equal scores is reproducible; E is small, so sorting costs what topk does. Only the indices are
    # used (the values are gathered below), so the sort needs no backward.
    top_indices = torch.argsort(router_probs.detach(), dim=-1, descending=True, stable=True)[..., :top_k]
    selected = torch.zeros_like(router_probs, dtype=torch.bool).scatter_(-1, top_indices, True)
    if renormalize:
        # The kept probabilities divided by their sum are a softmax over the kept logits (Switch / Mixtral); the
        # softmax form is one op each way instead of a sum, a division and their backward.
        top_weights = torch.softmax(router_logits.float().gather(-1, top_indices), dim=-1)
    else:
        top_weights = router_probs.gather(-1, top_indices)
    # Scattering the k kept weights into the dense (N, E) gate: its backward is a gather.
    routing_weights = torch.zeros_like(router_probs).scatter(-1, top_indices, top_weights)
    return routing_weights, router_probs, selected


def masked_mean(values: torch.Tensor, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over the token axis (dim 0) of ``values`` counting only real tokens."""
    if token_mask is None:
        return values.mean(dim=0)
    weights = aux_loss.token_weights(token_mask, values.shape[0], values.dtype, values.device)  # 1/n_real or 0
    return torch.mv(values.reshape(values.shape[0], -1).t(), weights).reshape(values.shape[1:])


def switch_balance_loss(router_probs: torch.Tensor, selected: torch.Tensor,
                        token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, Eq. 4-6): ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of tokens routed to expert ``e`` (summing to ``top_k``), ``P_e`` the mean router
    probability. Padding tokens are excluded. Equals ``top_k`` at perfect balance.
    """
    num_tokens, num_experts = router_probs.shape
    # Both token means are one matrix-vector product with the per-token weights 1/n_real (0 for padding), which every
    # layer of a batch shares (cached by the aux-loss window).
    weights = aux_loss.token_weights(token_mask, num_tokens, router_probs.dtype, router_probs.device)
    fraction_routed = torch.mv(selected.to(router_probs.dtype).t(), weights)  # (E,)
    mean_prob = torch.mv(router_probs.t(), weights)  # (E,)
    return torch.dot(fraction_routed, mean_prob) * num_experts


def cv_squared(values: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation with the unbiased variance (Shazeer et al. 2017); 0 for one expert."""
    if values.numel() <= 1:
        return values.new_zeros(())
    return values.float().var() / (values.float().mean() ** 2 + eps)


def record_routing(layer, routing_weights: torch.Tensor, selected: Optional[torch.Tensor],
                   token_mask: Optional[torch.Tensor]) -> None:
    """Hand per-expert load statistics of one layer to the aux-loss window (only when statistics are requested).

    Cheap enough to leave on: it runs only on logging steps, reduces ``(N, E)`` to a few ``(E,)`` vectors with
    matrix-vector products (padding weighted 0: no boolean indexing, so no host sync). ``selected`` None means every
    expert takes every token (dense routing). The summaries are defined in ``analysis.statistics``.
    """
    if not aux_loss.wants_routing():
        return
    with torch.no_grad():
        weights = routing_weights.float()  # (N, E)
        probs = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1)  # (N,) nats
        token_weights = (torch.ones(weights.shape[0], dtype=weights.dtype, device=weights.device)
                         if token_mask is None else token_mask.to(weights.dtype))  # (N,) 1 real, 0 padding
        tokens = token_weights.sum()
        aux_loss.record_routing(
            getattr(layer, "moe_layer_name", layer.__class__.__name__),
            tokens=tokens,
            load=tokens.expand(weights.shape[1]).clone() if selected is None else token_weights @ selected.float(),
            mass=token_weights @ weights,
            entropy_sum=token_weights @ entropy,
        )
