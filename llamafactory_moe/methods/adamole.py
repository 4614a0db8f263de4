"""AdaMoLE: Adaptive Mixture of LoRA Experts (Liu & Luo, COLM 2024, "AdaMoLE: Fine-Tuning Large Language Models with
Adaptive Mixture of Low-Rank Adaptation Experts", https://arxiv.org/abs/2405.00361).

Instead of a fixed top-k, each token activates the experts whose router probability clears a learned, token-dependent
threshold. Each wrapped linear gets E rank-r experts, a router W_g (E x in) and a threshold network (w_t, b_t):

    p(x)   = softmax(W_g x)                                            (float32)
    tau(x) = tau_max * sigmoid(w_t^T x + b_t)                          in (0, tau_max), tau_max = 1/E by default
    a_e    = p_e - tau,  m_e = 1[a_e >= 0],  w_e = m_e a_e / sum_j m_j a_j
    y      = W0 x + (alpha / r) * sum_e w_e(x) * B_e A_e dropout(x)
    L_aux  = aux_loss_coef * E * sum_e f_e * mean_tokens(a_e)          (f_e: fraction of tokens activating e)

With tau_max <= 1/E the largest p_e always clears the threshold (max p >= 1/E > tau). Since the aux loss is
decreasing in tau (dL/dtau = -E * sum_e f_e < 0), it also pushes thresholds up, towards sparser activation.

Reference code: zefang-liu/AdaMoLE@5e8599a7ad6f.

Deviations:
- A token with no active expert (possible only when `max_threshold` > 1/E, which upstream does not guard) falls back
  to its top-1 expert with weight 1. With `max_threshold` <= 1/E, as upstream, a token whose active experts all sit
  exactly on tau (sum_j m_j a_j = 0) gets weight 0 everywhere.
- The aux loss ignores padding tokens and is recorded only while training (upstream adds a stale value to the eval
  loss, §3.9.3). One dropout mask is shared by all experts (upstream draws one per expert).
- Experts run as one stacked GEMM pair with a dense gate (no per-expert loop or extra expert-0 pass, §3.9.1).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import Example, MoeLoraConfig, MoeLoraLayer, MoeLoraTuner, register_method
from ..core.errors import check_float
from ..core.experts import paired_experts
from ..core.routing import sum_normalize, switch_balance_loss


@dataclass
class AdaMoLEConfig(MoeLoraConfig):
    """AdaMoLE: threshold-activated LoRA experts (module docstring; spec §3). `top_k` is not used."""

    method_name: ClassVar[str] = "adamole"
    listing_order: ClassVar[int] = 60
    examples: ClassVar[tuple[Example, ...]] = (
        Example("adamole", dict(num_experts=4, expert_rank=2), dict(moe_num_experts=4, lora_rank=2)),
        Example("adamole-high-threshold",
                dict(num_experts=4, expert_rank=2, max_threshold=0.5),
                dict(moe_num_experts=4, lora_rank=2, moe_max_threshold=0.5)),
    )
    shared_fields: ClassVar[tuple[str, ...]] = ("num_experts", "expert_rank", "lora_alpha", "expert_dropout",
                                                 "aux_loss_coef")
    aux_loss_terms: ClassVar[tuple[str, ...]] = ("balance_loss",)
    default_aux_loss_coef: ClassVar[float] = 1e-3  # configs/llama_adamole_csr_train.config

    num_experts: int = field(default=8, metadata={"help": "Number of LoRA experts per wrapped layer (AdaMoLE: 8)."})
    top_k: Optional[int] = field(default=None, metadata={"help": "Unused: AdaMoLE activates experts by a learned "
                                                                 "threshold, not a fixed count."})
    max_threshold: Optional[float] = field(
        default=None,
        metadata={"help": "tau_max, the upper bound of the learned threshold tau(x) = tau_max * sigmoid(w^T x + b); "
                          "None = 1/num_experts, which guarantees at least one active expert. Larger values allow "
                          "sparser activation; tokens with no active expert then use their top-1 expert."},
    )

    def validate(self) -> None:
        super().validate()
        if self.top_k is not None:
            warnings.warn(f"`top_k` ({self.top_k}) specified but will be ignored: AdaMoLE activates experts by a "
                          "learned threshold (see `max_threshold`)", stacklevel=2)
        if self.max_threshold is not None:
            check_float("max_threshold", self.max_threshold, minimum=0.0, maximum=1.0, min_exclusive=True,
                        method=self.method_name)

    @property
    def effective_max_threshold(self) -> float:
        return 1.0 / self.num_experts if self.max_threshold is None else float(self.max_threshold)


def threshold_routing(router_logits: torch.Tensor, threshold_logits: torch.Tensor, max_threshold: float,
                      statistics: bool = True) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """AdaMoLE's threshold activation.

    Args:
        router_logits: ``(N, E)``; threshold_logits: ``(N, 1)`` (``w_t^T x + b_t``).
        statistics: also return the activation mask (for the balance loss and routing logs).
    Returns:
        ``(routing_weights (N, E), adapted_scores a = p - tau (N, E), selected (N, E) float 0/1 or None)``, float32.
    """
    router_probs = torch.softmax(router_logits.float(), dim=-1)
    num_experts = router_probs.shape[-1]
    threshold = max_threshold * torch.sigmoid(threshold_logits.float())  # (N, 1)
    adapted = router_probs - threshold  # (N, E)
    selected = (adapted >= 0).float() if statistics else None  # m_i = 1[a_i >= 0]
    kept = torch.relu(adapted)  # m_i * a_i
    if max_threshold <= 1.0 / num_experts:
        # max_i p_i >= 1/E >= tau_max > tau: some expert is always active. The sum is 0 only when tau rounds up to
        # exactly the uniform p; the paper's code then divides by 1 (all weights 0), as sum_normalize does.
        return sum_normalize(kept), adapted, selected
    # tau_max > 1/E: a token can clear no threshold; it then uses its top-1 expert with weight 1. Batched with
    # torch.where; the safe denominator keeps the unused branch finite so its zero gradient stays zero, not NaN.
    total = kept.sum(dim=-1, keepdim=True)  # (N, 1)
    fallback = total <= 0
    # A scatter, not F.one_hot: one_hot reads the indices' min and max back to the host to validate them (a sync).
    top1 = torch.zeros_like(router_probs).scatter_(-1, router_probs.argmax(dim=-1, keepdim=True), 1.0)  # (N, E)
    routing_weights = torch.where(fallback, top1, kept / total.masked_fill(fallback, 1.0))
    if selected is not None:
        selected = torch.where(fallback, top1, selected)
    return routing_weights, adapted, selected


class AdaMoLELayer(MoeLoraLayer):
    adapter_layer_names = ("adamole_A", "adamole_B", "adamole_router", "adamole_threshold",
                           "adamole_threshold_bias")
    paired_expert_names = ("adamole_A", "adamole_B")
    fuses_residual = True

    def create_adapter(self, adapter_name: str, config: AdaMoLEConfig) -> None:
        total_rank = config.num_experts * config.expert_rank
        self.adamole_A[adapter_name] = nn.Parameter(torch.empty(total_rank, self.in_features))  # (E*r, in)
        self.adamole_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, total_rank))  # (out, E*r)
        self.adamole_router[adapter_name] = nn.Parameter(torch.empty(config.num_experts, self.in_features))  # (E, in)
        self.adamole_threshold[adapter_name] = nn.Parameter(torch.empty(1, self.in_features))  # (1, in): w_t
        self.adamole_threshold_bias[adapter_name] = nn.Parameter(torch.empty(1))  # (1,): b_t

    @torch.no_grad()
    def reset_adapter(self, adapter_name: str, config: AdaMoLEConfig) -> None:
        # torch's nn.Linear defaults, as upstream: weights U(+-1/sqrt(in)), the threshold bias U(+-1/sqrt(in)).
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.kaiming_uniform_(self.adamole_A[adapter_name], a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.adamole_router[adapter_name], a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.adamole_threshold[adapter_name], a=math.sqrt(5))
        nn.init.uniform_(self.adamole_threshold_bias[adapter_name], -bound, bound)
        if config.init_weights:
            nn.init.zeros_(self.adamole_B[adapter_name])
        else:
            nn.init.kaiming_uniform_(self.adamole_B[adapter_name], a=math.sqrt(5))

    def adapter_delta(self, adapter_name: str, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
        config: AdaMoLEConfig = self.moe_config[adapter_name]
        # Router and threshold in float32: the activation compares probabilities with tau directly.
        x32 = x.float()
        router_logits = F.linear(x32, self.adamole_router[adapter_name].float())  # (N, E)
        threshold_logits = F.linear(x32, self.adamole_threshold[adapter_name].float(),
                                    self.adamole_threshold_bias[adapter_name].float())  # (N, 1)
        routing_weights, adapted, selected = threshold_routing(router_logits, threshold_logits,
                                                               config.effective_max_threshold,
                                                               statistics=self.wants_routing_statistics())
        token_mask = self.token_mask(x.shape[0])
        if self.training:  # record_aux keeps it only in training (not conditioned on the window: see core.loss_window)
            # E * sum_e f_e * mean(a_e): Switch's form with the adapted scores in place of the probabilities.
            balance = switch_balance_loss(adapted, selected, self.token_weights(token_mask, adapted))
            self.record_aux("balance_loss", balance, config.effective_aux_loss_coef)
        self.record_routing(routing_weights, selected, token_mask)
        return paired_experts(self.moe_dropout[adapter_name](x), self.adamole_A[adapter_name],
                              self.adamole_B[adapter_name], routing_weights, config.expert_rank, config.scaling,
                              residual)


class AdaMoLEModel(MoeLoraTuner):
    prefix = "adamole_"
    tuner_layer_cls = AdaMoLELayer


register_method(AdaMoLEConfig, AdaMoLEModel)
