"""MoELoRA: a token-routed mixture of LoRA experts (the classic MoE-LoRA baseline).

Each wrapped linear layer gets E LoRA experts (A_e: r x in, B_e: out x r) and a linear router W_g (E x in):

    p(x)   = softmax(W_g x)                                    (float32)
    w(x)   = top-k of p(x), renormalised to sum 1              (soft routing when top_k is None)
    y      = W0 x + (alpha / r) * sum_e w_e(x) * B_e A_e dropout(x)
    L_aux  = aux_loss_coef * E * sum_e f_e * P_e               (Switch load balancing, Fedus et al. 2021, Eq. 4)

This is the token-level variant used as "MOELoRA" / "MixLoRA" in D2MoRA's and S'MoRE's comparison tables.
The original MOELoRA (Liu et al. 2023) gates on a task embedding instead
of the token; we route on the token so no task id is needed at inference.

Deviations:
- Experts are computed as one stacked GEMM pair (core.experts.paired_experts), not a loop over experts.
- Top-k ties go to the lower expert index (a stable descending sort, core.routing.top_k_keep_bias); upstream's
  `torch.topk` leaves the order of equal scores unspecified (it may differ by device). Only exactly equal scores
  are affected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import Example, MoeLoraConfig, MoeLoraLayer, MoeLoraTuner, register_method
from ..core.experts import paired_experts


@dataclass
class MoELoRAConfig(MoeLoraConfig):
    """Token-routed mixture of LoRA experts. Shared fields only (see ``MoeLoraConfig``)."""

    method_name: ClassVar[str] = "moelora"
    listing_order: ClassVar[int] = 10
    examples: ClassVar[tuple[Example, ...]] = (
        Example("moelora-top2",
                dict(num_experts=4, top_k=2, expert_rank=4),
                dict(moe_num_experts=4, moe_top_k=2, lora_rank=4)),
        Example("moelora-soft",
                dict(num_experts=3, top_k=None, expert_rank=4),
                dict(moe_num_experts=3, moe_top_k=3, lora_rank=4)),
    )
    aux_loss_terms: ClassVar[tuple[str, ...]] = ("balance_loss",)
    default_aux_loss_coef: ClassVar[float] = 1e-2  # Switch Transformer's alpha

    num_experts: int = field(default=4, metadata={"help": "Number of LoRA experts per wrapped layer."})
    top_k: Optional[int] = field(default=2, metadata={"help": "Experts per token; None = soft routing over all."})


class MoELoRALayer(MoeLoraLayer):
    adapter_layer_names = ("moelora_A", "moelora_B", "moelora_router")
    paired_expert_names = ("moelora_A", "moelora_B")
    fuses_residual = True

    def create_adapter(self, adapter_name: str, config: MoELoRAConfig) -> None:
        total_rank = config.num_experts * config.expert_rank
        self.moelora_A[adapter_name] = nn.Parameter(torch.empty(total_rank, self.in_features))  # (E*r, in)
        self.moelora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, total_rank))  # (out, E*r)
        self.moelora_router[adapter_name] = nn.Parameter(torch.empty(config.num_experts, self.in_features))  # (E, in)

    @torch.no_grad()
    def reset_adapter(self, adapter_name: str, config: MoELoRAConfig) -> None:
        # kaiming_uniform(a=sqrt(5)) on (E*r, in) is U(+-1/sqrt(in)) for every expert: fan_in is `in` either way.
        nn.init.kaiming_uniform_(self.moelora_A[adapter_name], a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.moelora_router[adapter_name], a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.moelora_B[adapter_name])
        else:
            nn.init.kaiming_uniform_(self.moelora_B[adapter_name], a=math.sqrt(5))

    def adapter_delta(self, adapter_name: str, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
        config: MoELoRAConfig = self.moe_config[adapter_name]
        router_logits = F.linear(x, self.moelora_router[adapter_name])  # (N, E)
        # softmax, top-k, renormalise; the Switch balance loss in training (core.layer.MoeLoraLayer.switch_route)
        routing_weights = self.switch_route(router_logits, config.top_k, config.effective_aux_loss_coef)
        x = self.moe_dropout[adapter_name](x)
        return paired_experts(x, self.moelora_A[adapter_name], self.moelora_B[adapter_name], routing_weights,
                              config.expert_rank, config.scaling, residual)


class MoELoRAModel(MoeLoraTuner):
    prefix = "moelora_"
    tuner_layer_cls = MoELoRALayer


register_method(MoELoRAConfig, MoELoRAModel)
