"""Routers and balance losses shared by the methods: pure functions on ``[num_tokens, num_experts]`` tensors.

Conventions (Mixtral's names): ``router_logits`` are pre-normalisation scores, ``router_probs`` their softmax (always
float32: a bf16 softmax over experts loses the small differences routing depends on), ``routing_weights`` the dense
``[N, E]`` gate actually applied (zero for experts a token does not use) and ``selected`` the mask of used experts
(bool or float 0/1). Sparse top-k is represented densely so the expert kernels need no gather/scatter and no Python
loop.

Pure: nothing here reads or writes state. Means over the batch's real tokens take ``token_weights`` — ``(N,)``, 1/n_real
for a real token and 0 for padding — which the layer hands in (``MoeLoraLayer.token_weights``, cached per batch by the
loss window); what a layer records goes through the layer's helpers (``record_aux``, ``record_routing``).
"""

from __future__ import annotations

from typing import Optional

import torch


def top_k_keep_bias(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """``(N, E)``: 0 on each token's ``top_k`` highest scores, -inf elsewhere (no gradient). ``exp()`` of it is the
    float 0/1 selection mask.

    The selection is that of a stable descending sort: ties go to the lower expert index on every device
    (torch.topk's tie order is unspecified), so routing of equal scores is reproducible; NaN ranks above every number
    (as in torch.sort), NaNs among themselves by index. Two forms give the same mask
    (``tests/core/test_routing_topk.py``):

    * under ``torch.compile`` with E < 8 (``pairwise_rank_fuses``): the pairwise rank (``pairwise_rank``), because
      inductor cannot fuse a sort: it calls aten's ``sort`` as a fallback, then fills ``full(-inf)`` and scatters
      into it (two loop nests), while the pairwise rank is a broadcast compare + sum that inductor unrolls into one
      loop nest (never materialising the ``(N, E, E)`` compare);
    * otherwise (eager, or E >= 8 where the pairwise rank is slower than the sort): ``argsort`` + ``scatter``.
    """
    with torch.no_grad():
        if pairwise_rank_fuses(scores.shape[-1]):
            keep = pairwise_rank(scores) < top_k
            return torch.where(keep, 0.0, float("-inf")).to(scores.dtype)
        top_indices = torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :top_k]
        return torch.full_like(scores, float("-inf")).scatter_(-1, top_indices, 0.0)


def pairwise_rank(scores: torch.Tensor) -> torch.Tensor:
    """``(..., E)`` int32: each score's position in a stable descending sort of its row (0 = highest), without sorting.

    ``rank_e = #{j : s_j > s_e} + #{j < e : s_j == s_e}``: the experts ahead of ``e`` are the strictly higher ones and
    the equal ones of lower index, which is where a stable descending sort puts them. NaN counts as higher than every
    number and equal to NaN (torch.sort's order). One ``(..., E, E)`` broadcast compare reduced over the last axis:
    work that inductor fuses (and unrolls for E < 8), where a sort is an unfusable fallback call.
    """
    num_experts = scores.shape[-1]
    other, own = scores.unsqueeze(-2), scores.unsqueeze(-1)  # s_j along the last axis, s_e along the one before
    other_nan, own_nan = other != other, own != own  # isnan as a compare: inductor vectorises it (not isnan)
    index = torch.arange(num_experts, device=scores.device, dtype=torch.int32)
    lower_index = index.unsqueeze(0) < index.unsqueeze(1)  # (E, E): [e, j] = j < e
    # A compare with NaN is false: NaN is higher than a number by its flag, equal to NaN by both flags.
    higher = (other > own) | (other_nan & ~own_nan)
    tied = (other == own) | (other_nan & own_nan)
    return (higher | (tied & lower_index)).sum(dim=-1, dtype=torch.int32)


def pairwise_rank_fuses(num_experts: int) -> bool:
    """Whether the top-k of ``num_experts`` scores uses the pairwise rank: only under ``torch.compile`` and only while
    inductor unrolls the rank's reduction over E (``unroll_reductions_threshold``, 8: E < 8), so the E compares per
    expert become straight-line code in one loop nest over the tokens. A rolled reduction over E is O(E^2) per token
    in a loop of its own: on the 2-core CPU of the README, top-k of 1024 tokens compiled, E = 8 took 0.50 ms vs 0.05
    ms for the sort fallback + scatter, E = 32 (SMoRA's ranks) 2.0 ms vs 0.65 ms; unrolled, E = 4 took 0.02 ms vs 0.05
    ms. Eager always sorts (one op; the pairwise rank would be ~10 eager ops and an (N, E, E) temporary)."""
    if not torch.compiler.is_compiling():
        return False
    try:
        from torch._inductor import config as inductor_config

        threshold = int(inductor_config.unroll_reductions_threshold)
    except (ImportError, AttributeError):
        threshold = 8
    return num_experts < threshold


def top_k_one_hot(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """``(..., E, top_k)`` bool: ``[e, r]`` is True where expert ``e`` is a row's ``r``-th highest score, in the order
    of a stable descending sort (ties to the lower index, NaN first). For compiled code with small E
    (``pairwise_rank_fuses``): ``pairwise_rank == r``, which inductor fuses, where a sort is an aten fallback call.
    ``(one_hot * arange(E)[:, None]).sum(-2)`` are the indices, ``one_hot.any(-1)`` the kept mask,
    ``(values[..., None] * one_hot).sum(-2)`` a gather in rank order."""
    with torch.no_grad():
        ranks = torch.arange(top_k, device=scores.device)
        return pairwise_rank(scores).unsqueeze(-1) == ranks


def top_k_indices(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """``(..., top_k)`` int64: the positions of each row's ``top_k`` highest scores, highest first, in the order of a
    stable descending sort (ties to the lower index, NaN first) — ``argsort(descending, stable)[..., :top_k]``.

    Under ``torch.compile`` with E < 8 (``pairwise_rank_fuses``) the indices come from ``top_k_one_hot`` instead of a
    sort (see ``top_k_keep_bias`` for why); otherwise the sort: one op.
    """
    with torch.no_grad():
        if pairwise_rank_fuses(scores.shape[-1]):
            experts = torch.arange(scores.shape[-1], device=scores.device)
            return (top_k_one_hot(scores, top_k) * experts.unsqueeze(-1)).sum(dim=-2)
        return torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :top_k]


def softmax_top_k(router_logits: torch.Tensor, top_k: Optional[int], renormalize: bool = True,
                  statistics: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Softmax over experts, keep the top-k per token, optionally renormalise the kept probabilities.

    Args:
        router_logits: ``(N, E)``.
        top_k: experts per token; ``None`` or ``E`` keeps all (soft routing).
        statistics: also return ``router_probs`` and ``selected`` (for balance losses and routing logs). Pass
            ``layer.wants_routing_statistics()``: inference needs neither, and skips their kernels.
    Returns:
        ``(routing_weights (N, E) fp32, router_probs (N, E) fp32 | None, selected (N, E) float 0/1 | None)``;
        ``selected`` is None with soft routing (every expert takes every token).
    """
    logits = router_logits.float()
    num_experts = logits.shape[-1]
    if top_k is None or top_k >= num_experts:
        router_probs = torch.softmax(logits, dim=-1)
        return router_probs, router_probs, None
    # The softmax is monotonic, so the logits select like the probabilities. Added to the logits, the keep-bias drops
    # the other experts from a softmax: renormalised top-k weights in one softmax, whose backward is one kernel (the
    # add of a constant has a free backward), instead of gather -> softmax -> scatter and their three backward kernels.
    keep_bias = top_k_keep_bias(logits, top_k)
    router_probs = torch.softmax(logits, dim=-1) if statistics or not renormalize else None
    selected = keep_bias.exp() if statistics or not renormalize else None  # exp(0) = 1 kept, exp(-inf) = 0 dropped
    if renormalize:
        # The kept probabilities divided by their sum are a softmax over the kept logits (Switch / Mixtral).
        routing_weights = torch.softmax(logits + keep_bias, dim=-1)
    else:
        routing_weights = router_probs * selected
    if not statistics:
        return routing_weights, None, None
    return routing_weights, router_probs, selected


class _SumNormalize(torch.autograd.Function):
    """``w = v / sum_e v_e`` over the last axis, a zero sum replaced by 1 (the row stays 0, with the gradient of a
    division by 1). The backward is written out: ``dL/dv = (g - sum_e g_e w_e) / total`` is four kernels, where
    autograd's division backward with a broadcast denominator and a guard takes nine."""

    @staticmethod
    def forward(ctx, values: torch.Tensor) -> torch.Tensor:
        total = values.sum(dim=-1, keepdim=True)
        total = total.masked_fill(total == 0, 1.0)
        weights = values / total
        ctx.save_for_backward(weights, total)
        return weights

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weights, total = ctx.saved_tensors
        return (grad - (grad * weights).sum(dim=-1, keepdim=True)) / total


def sum_normalize(values: torch.Tensor) -> torch.Tensor:
    """Non-negative per-expert scores ``(N, E)`` divided by their sum over experts (a row summing to 0 stays 0)."""
    return _SumNormalize.apply(values)


def masked_mean(values: torch.Tensor, token_weights: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over the token axis (dim 0) of ``values`` counting only real tokens (``token_weights`` None: every
    token)."""
    if token_weights is None:
        return values.mean(dim=0)
    return torch.mv(values.reshape(values.shape[0], -1).t(), token_weights).reshape(values.shape[1:])


def switch_balance_loss(router_probs: torch.Tensor, selected: torch.Tensor,
                        token_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, Eq. 4-6): ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of tokens routed to expert ``e`` (summing to ``top_k``), ``P_e`` the mean router
    probability. Padding tokens (weight 0) are excluded. Equals ``top_k`` at perfect balance.
    """
    num_tokens, num_experts = router_probs.shape
    # Both token means are one matrix-vector product with the per-token weights, which every layer of a batch shares.
    weights = token_weights if token_weights is not None else router_probs.new_full((num_tokens,), 1.0 / num_tokens)
    # E rides on the routed fraction, which has no gradient: no multiply kernel in the backward.
    fraction_routed = torch.mv(selected.to(router_probs.dtype).t(), weights) * num_experts  # (E,)
    mean_prob = torch.mv(router_probs.t(), weights)  # (E,)
    return torch.dot(fraction_routed, mean_prob)


def cv_squared(values: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation with the unbiased variance (Shazeer et al. 2017); 0 for one expert."""
    if values.numel() <= 1:
        return values.new_zeros(())
    return values.float().var() / (values.float().mean() ** 2 + eps)


@torch.no_grad()
def routing_summary(routing_weights: torch.Tensor, selected: Optional[torch.Tensor],
                    token_mask: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert load statistics of one layer forward, detached: ``tokens`` (real tokens), ``load`` (tokens routed to
    each expert), ``mass`` (summed gate) and ``entropy_sum`` (summed per-token routing entropy, nats).

    Reduces ``(N, E)`` to a few ``(E,)`` vectors with matrix-vector products (padding weighted 0: no boolean indexing,
    so no host sync). ``selected`` None means every expert takes every token (dense routing). ``analysis.statistics``
    turns summed summaries into the logged statistics.
    """
    weights = routing_weights.float()  # (N, E)
    probs = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
    entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1)  # (N,) nats
    token_weights = (torch.ones(weights.shape[0], dtype=weights.dtype, device=weights.device)
                     if token_mask is None else token_mask.to(weights.dtype))  # (N,) 1 real, 0 padding
    tokens = token_weights.sum()
    return {
        "tokens": tokens,
        "load": tokens.expand(weights.shape[1]).clone() if selected is None else token_weights @ selected.float(),
        "mass": token_weights @ weights,
        "entropy_sum": token_weights @ entropy,
    }
