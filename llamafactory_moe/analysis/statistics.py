"""Routing statistics from per-layer routing summaries: one implementation for training logs and ``analyze``.

A layer's summary is what ``MoeLoraLayer.record_routing`` hands to the loss window (``core.routing.routing_summary``),
summed over the forwards of a logging window (or of one task in ``llamafactory-moe analyze``); padding tokens are never
counted:

* ``tokens``: ``()`` number of real tokens,
* ``load``: ``(E,)`` tokens that selected each expert,
* ``mass``: ``(E,)`` sum over tokens of each expert's gate weight,
* ``entropy_sum``: ``()`` sum over tokens of the entropy (nats) of the token's gate, normalised to sum 1.

Definitions (E experts of a layer; "overall" values are the mean over layers):

* **load** ``(E,)``, summing to 1: the fraction of routed tokens per expert (``load / load.sum()``). When every token
  uses every expert (dense routers: D2MoRA, HydraLoRA, S'MoRE's dense gate, ``top_k == E``) token counts say nothing,
  so the load is the fraction of gate mass instead (``mass / mass.sum()``).
* **load CV**: coefficient of variation of the load, ``std / mean`` with the population std; 0 = perfectly balanced,
  ``sqrt(E - 1)`` = one expert takes everything.
* **router entropy**: mean per-token entropy of the applied gate divided by ``log E``: 0 = one expert per token, 1 =
  uniform over all E experts (a top-k router is at most ``log k / log E``). 0 for E = 1.
* **dropped expert fraction**: mean over tokens of the fraction of experts a token does not use,
  ``1 - load.sum() / (tokens * E)``: ``1 - k/E`` for top-k, the threshold drops of AdaMoLE, the ``r - k`` unselected
  ranks of SMoRA, 0 for dense routers.
* **inactive expert fraction**: fraction of experts that no token selected at all (dead experts in this window).
* **expert similarity**: mean ``|cos|`` over expert pairs ``i < j`` of their flattened weights
  (``MoeLoraLayer.expert_weight_vectors``); D2MoRA's diversity term is the sum of the same cosines. 1 = collapsed
  experts (identical or opposite), 0 = mutually orthogonal. Layers without meaningful experts (MoSLoRA) are skipped.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

SUMMARY_KEYS = ("tokens", "load", "mass", "entropy_sum")


def accumulate(acc: dict[str, torch.Tensor], summary: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add one forward's summary of a layer to ``acc`` (in place; returns it)."""
    for key, value in summary.items():
        acc[key] = acc[key] + value if key in acc else value.detach().clone()
    return acc


def is_dense(summary: Mapping[str, torch.Tensor]) -> bool:
    """True when every real token selected every expert (token counts then carry no load information)."""
    load, tokens = summary["load"].float(), summary["tokens"].float()
    return bool(torch.all(load >= tokens))


def expert_load(summary: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(E,)`` fraction of routed tokens per expert (of gate mass for dense selection); sums to 1 (0s if empty)."""
    counts = summary["mass"] if is_dense(summary) else summary["load"]
    counts = counts.float()
    return counts / counts.sum().clamp_min(1e-20)


def load_cv(load: torch.Tensor) -> float:
    """Coefficient of variation ``std / mean`` (population std) of a load vector; 0 for one expert."""
    load = load.float()
    if load.numel() <= 1:
        return 0.0
    return float(load.std(unbiased=False) / load.mean().clamp_min(1e-20))


def router_entropy(summary: Mapping[str, torch.Tensor]) -> float:
    """Mean per-token gate entropy divided by ``log E`` (0 = one expert, 1 = uniform over all); 0 for E = 1."""
    num_experts = summary["load"].numel()
    if num_experts <= 1:
        return 0.0
    return float(summary["entropy_sum"].float() / summary["tokens"].float().clamp_min(1.0)) / math.log(num_experts)


def dropped_expert_frac(summary: Mapping[str, torch.Tensor]) -> float:
    """Mean over tokens of the fraction of experts a token does not use."""
    num_experts = summary["load"].numel()
    used = summary["load"].float().sum() / (summary["tokens"].float().clamp_min(1.0) * num_experts)
    return float(1.0 - used) if float(summary["tokens"]) > 0 else 0.0


def inactive_expert_frac(summary: Mapping[str, torch.Tensor]) -> float:
    """Fraction of experts that no token selected."""
    return float((summary["load"].float() == 0).float().mean())


def cosine_similarity_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """``(E, E)`` cosine similarity of the rows of ``vectors: (E, n)`` (a zero row has cosine 0 with everything)."""
    flat = vectors.detach().float().reshape(vectors.shape[0], -1)
    unit = flat / torch.linalg.vector_norm(flat, dim=-1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.T


def expert_similarity(vectors: torch.Tensor) -> Optional[float]:
    """Mean ``|cos|`` over pairs ``i < j`` of expert weight vectors ``(E, n)``; None for fewer than two experts."""
    num_experts = vectors.shape[0]
    if num_experts < 2:
        return None
    cos = cosine_similarity_matrix(vectors).abs()
    return float(cos.triu(diagonal=1).sum() / (num_experts * (num_experts - 1) / 2))


def layer_statistics(summary: Mapping[str, torch.Tensor]) -> dict:
    """Every statistic of one layer's summary, JSON-ready."""
    load = expert_load(summary)
    return {
        "tokens": int(round(float(summary["tokens"]))),
        "load": [round(float(v), 6) for v in load],
        "load_basis": "mass" if is_dense(summary) else "tokens",
        "load_cv": round(load_cv(load), 6),
        "router_entropy": round(router_entropy(summary), 6),
        "dropped_expert_frac": round(dropped_expert_frac(summary), 6),
        "inactive_expert_frac": round(inactive_expert_frac(summary), 6),
    }


def model_expert_vectors(model) -> dict[str, torch.Tensor]:
    """Layer name -> ``(E, n)`` expert weight vectors of the first active adapter, for layers that have experts."""
    from ..core.layer import MoeLoraLayer

    out = {}
    for module in model.modules():
        if not isinstance(module, MoeLoraLayer):
            continue
        adapters = [a for a in module.active_adapters if a in module.moe_config]
        vectors = module.expert_weight_vectors(adapters[0]) if adapters else None
        # Under DeepSpeed ZeRO-3 a partitioned parameter is empty outside forward: skip rather than gather.
        if vectors is not None and vectors.numel() > 0:
            out[module.moe_layer_name or type(module).__name__] = vectors
    return out


def routing_metrics(routing: Mapping[str, Mapping[str, torch.Tensor]],
                    similarities: Optional[Mapping[str, float]] = None) -> tuple[dict[str, float], dict[str, dict]]:
    """Overall ``moe_*`` scalars (means over layers) and per-layer statistics.

    Args:
        routing: layer name -> accumulated summary (``SUMMARY_KEYS``).
        similarities: layer name -> expert similarity (layers with experts only).
    """
    per_layer = {name: layer_statistics(summary) for name, summary in sorted(routing.items())}
    for name, value in (similarities or {}).items():
        per_layer.setdefault(name, {})["expert_similarity"] = value
    overall: dict[str, float] = {}

    def mean_of(key: str) -> Optional[float]:
        values = [stats[key] for stats in per_layer.values() if stats.get(key) is not None]
        return sum(values) / len(values) if values else None

    for key, metric in (("load_cv", "moe_load_cv"), ("router_entropy", "moe_router_entropy"),
                        ("dropped_expert_frac", "moe_dropped_expert_frac"),
                        ("inactive_expert_frac", "moe_inactive_expert_frac"),
                        ("expert_similarity", "moe_expert_similarity")):
        value = mean_of(key)
        if value is not None:
            overall[metric] = value
    return overall, per_layer
