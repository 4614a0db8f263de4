"""D2MoRA: Diversity-Regulated Asymmetric MoE-LoRA Decomposition (AAAI 2026, https://github.com/iLearn-Lab/AAAI26-D2MoRA).

Each wrapped linear W0 (out x in) gets M down-projection experts A_i (r x in), N up-projection experts B_j (out x r)
and two dense routers, R1 (M x in) over the A-experts and R2 (N x r) over the B-experts:

    g1(x) = softmax(R1 x)                              (float32, on the input without dropout)
    h(x)  = sum_i g1_i(x) * A_i dropout(x)             (one mixed rank-r code)
    g2(x) = softmax(R2 h(x))                           (float32; the second router reads h, not x)
    y     = W0 x + (alpha / r) * sum_j g2_j(x) * B_j h(x)
          = W0 x + (alpha / r) * sum_j sum_i g2_j g1_i B_j A_i dropout(x)      (all M x N pairs, product gates)
    Omega = sum_{i<j<=M} |cos(vec A_i, vec A_j)| + sum_{i<j<=N} |cos(vec B_i, vec B_j)|
            with cos(u, v) = <u, v> / ((|u| + 1e-6) (|v| + 1e-6));  L = L_LM + lambda * sum_layers Omega

lambda is ``aux_loss_coef`` (1e-4, summed over layers, not averaged, as upstream). Omega is computed from the weights
inside ``forward``, so it also works under DeepSpeed ZeRO-3, which materialises parameters only there.

Reference code: iLearn-Lab/AAAI26-D2MoRA@c60b03f793eb.

Deviations:
- One dropout mask is shared by the A-experts by default (upstream draws one per expert, §1.11.6); set
  ``per_expert_dropout`` for independent masks, still one batched op on an (N, M, in) view.
- Omega is added only in training (upstream also adds it to the eval loss, which biases best-checkpoint selection,
  §1.11.10), and is skipped when ``aux_loss_coef`` is 0.
- Experts run as stacked kernels (core.experts.mixed_down_projection / routed_up_projection), not M + N matmuls; h
  is kept in the adapter dtype (upstream accumulates it in fp32), while both routers run in fp32.
- No merge: the gates depend on the input (upstream's merge code crashes, §1.11.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import Example, MoeConfigError, MoeLoraConfig, MoeLoraLayer, MoeLoraTuner, register_method
from ..core.errors import check_bool, check_int
from ..core.experts import mixed_down_projection, routed_up_projection

COSINE_EPS = 1e-6  # added to each Frobenius norm, as upstream


@dataclass
class D2MoRAConfig(MoeLoraConfig):
    """D2MoRA: M down-experts mixed into one code, N up-experts reading it, two dense routers (module docstring)."""

    method_name: ClassVar[str] = "d2mora"
    listing_order: ClassVar[int] = 40
    examples: ClassVar[tuple[Example, ...]] = (
        Example("d2mora",
                dict(num_down_experts=3, num_experts=2, expert_rank=2),
                dict(moe_num_down_experts=3, moe_num_experts=2, lora_rank=2)),
        Example("d2mora-one-down-expert",
                dict(num_down_experts=1, num_experts=3, expert_rank=2, aux_loss_coef=1e-2),
                dict(moe_num_down_experts=1, moe_num_experts=3, lora_rank=2, moe_aux_loss_coef=1e-2)),
    )
    shared_fields: ClassVar[tuple[str, ...]] = ("num_experts", "expert_rank", "lora_alpha", "expert_dropout",
                                                 "aux_loss_coef")
    aux_loss_terms: ClassVar[tuple[str, ...]] = ("diversity_loss",)
    default_aux_loss_coef: ClassVar[float] = 1e-4  # lambda, hard-coded upstream

    num_experts: int = field(
        default=3,
        metadata={"help": "N: number of up-projection (B) experts, mixed by the second router, which reads the "
                          "rank-r code h (upstream `expert_up`; paper setting 3). The number of down-projection "
                          "experts is `num_down_experts`."},
    )
    top_k: Optional[int] = field(
        default=None, metadata={"help": "Must stay None: both D2MoRA routers are dense softmaxes over all experts."}
    )
    num_down_experts: int = field(
        default=4,
        metadata={"help": "M: number of down-projection (A) experts, mixed by the first router (on x) into one "
                          "rank-r code (upstream `expert_down`; paper setting 4)."},
    )
    per_expert_dropout: bool = field(
        default=False,
        metadata={"help": "True: each down-projection expert sees its own dropout mask of the input (upstream "
                          "behaviour; costs an (tokens x experts x in) tensor). False: one mask shared by all "
                          "experts."},
    )

    def validate(self) -> None:
        super().validate()
        m = self.method_name
        if self.top_k is not None:
            raise MoeConfigError("top_k", self.top_k, "must be None: both routers are dense softmaxes",
                                 "remove `top_k`", method=m)
        check_int("num_down_experts", self.num_down_experts, minimum=1, method=m)
        check_bool("per_expert_dropout", self.per_expert_dropout, method=m)


def sum_abs_pairwise_cosine(*groups: torch.Tensor, eps: float = COSINE_EPS) -> torch.Tensor:
    """``sum_{i<j} |<v_i, v_j>| / ((|v_i| + eps)(|v_j| + eps))`` over the experts ``v_i = group[i].flatten()`` of each
    group, summed over the groups (pairs never span two groups).

    Args:
        groups: ``(K_g, ...)`` each, expert ``i`` is ``group[i]`` (any trailing shape).
    Returns:
        fp32 scalar; 0 for one expert.
    """
    flats = [group.float().reshape(group.shape[0], -1) for group in groups]  # (K_g, D_g)
    # All groups in one Gram matrix: block-diagonal rows have exact zeros across groups, so the cross-group cosines are
    # exactly 0 and the sum is the per-group sums, in one set of kernels instead of one per group.
    flat = flats[0] if len(flats) == 1 else torch.block_diag(*flats)  # (K, D)
    # vector_norm has a zero subgradient at 0 (B = 0 at init); sqrt of the Gram diagonal would give NaN.
    unit = flat / (torch.linalg.vector_norm(flat, dim=-1, keepdim=True) + eps)  # (K, D)
    return (unit @ unit.T).abs().triu(diagonal=1).sum()


class D2MoRALayer(MoeLoraLayer):
    adapter_layer_names = ("d2mora_A", "d2mora_B", "d2mora_router_down", "d2mora_router_up")
    up_expert_name = "d2mora_B"  # the up-experts B_j, which router 2 routes; A-experts: `moe_diversity_loss`
    fuses_residual = True

    def create_adapter(self, adapter_name: str, config: D2MoRAConfig) -> None:
        M, N, r = config.num_down_experts, config.num_experts, config.expert_rank
        self.d2mora_A[adapter_name] = nn.Parameter(torch.empty(M * r, self.in_features))  # (M*r, in)
        self.d2mora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, N * r))  # (out, N*r)
        self.d2mora_router_down[adapter_name] = nn.Parameter(torch.empty(M, self.in_features))  # (M, in): R1
        self.d2mora_router_up[adapter_name] = nn.Parameter(torch.empty(N, r))  # (N, r): R2

    @torch.no_grad()
    def reset_adapter(self, adapter_name: str, config: D2MoRAConfig) -> None:
        # kaiming_uniform(a=sqrt(5)) on (M*r, in) is U(+-1/sqrt(in)) for every expert: fan_in is `in` either way.
        nn.init.kaiming_uniform_(self.d2mora_A[adapter_name], a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.d2mora_router_down[adapter_name], a=math.sqrt(5))  # U(+-1/sqrt(in))
        nn.init.kaiming_uniform_(self.d2mora_router_up[adapter_name], a=math.sqrt(5))  # U(+-1/sqrt(r))
        if config.init_weights:
            nn.init.zeros_(self.d2mora_B[adapter_name])
        else:
            nn.init.kaiming_uniform_(self.d2mora_B[adapter_name], a=math.sqrt(5))

    def adapter_delta(self, adapter_name: str, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
        config: D2MoRAConfig = self.moe_config[adapter_name]
        A, B = self.d2mora_A[adapter_name], self.d2mora_B[adapter_name]
        M, N, r = config.num_down_experts, config.num_experts, config.expert_rank
        token_mask = self.token_mask(x.shape[0])

        # Router 1 in float32 on the undropped input (as upstream); dense softmax over the M down-experts.
        router_logits_down = F.linear(x.float(), self.d2mora_router_down[adapter_name].float())  # (N_tok, M)
        weights_down = torch.softmax(router_logits_down, dim=-1)
        dropout = self.moe_dropout[adapter_name]
        if config.per_expert_dropout and self.training and config.expert_dropout > 0:
            # One dropout call on an expanded view draws an independent mask per expert: (N_tok, M, in).
            x_per_expert = dropout(x.unsqueeze(1).expand(-1, M, -1))
            codes = torch.einsum("nmi,mri->nmr", x_per_expert, A.view(M, r, -1))  # (N_tok, M, r)
            h = torch.bmm(weights_down.to(codes.dtype).unsqueeze(1), codes).squeeze(1)  # (N_tok, r)
        else:
            h = mixed_down_projection(dropout(x), A, weights_down, r)  # (N_tok, r)

        # Router 2 in float32 on the mixed code h (not detached); dense softmax over the N up-experts.
        router_logits_up = F.linear(h.float(), self.d2mora_router_up[adapter_name].float())  # (N_tok, N)
        weights_up = torch.softmax(router_logits_up, dim=-1)
        self.record_routing(weights_up, None, token_mask)  # dense: every expert selected

        coef = config.effective_aux_loss_coef
        if self.training and coef > 0:
            # B_j is the column block [j*r, (j+1)*r): view (out, N, r) and put the expert axis first.
            diversity = sum_abs_pairwise_cosine(A.view(M, r, -1), B.view(-1, N, r).transpose(0, 1))
            self.record_aux("diversity_loss", diversity, coef)
        return routed_up_projection(h, B, weights_up, config.scaling, residual)


class D2MoRAModel(MoeLoraTuner):
    prefix = "d2mora_"
    tuner_layer_cls = D2MoRALayer


register_method(D2MoRAConfig, D2MoRAModel)
