"""HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning (Tian et al., NeurIPS 2024,
https://arxiv.org/abs/2404.19245).

Each wrapped linear W0 (out x in) gets one shared down-projection A (r x in), N up-projection heads B_j (out x r) and
a linear router R (N x in):

    g(x) = softmax(R x)                                   (float32, dense: every head, no top-k)
    y    = W0 x + (alpha / r) * sum_j g_j(x) * B_j A dropout(x)

A is applied once per token and its code is shared by all heads (core.experts.routed_up_projection).
Optional (off by default, as upstream, which ships an unused helper): a cv^2 importance-balance term over heads,
``L_aux = aux_loss_coef * cv^2(mean_tokens g(x))`` (Shazeer et al. 2017), padding excluded.

Reference code: Clin0212/HydraLoRA@afb693bc1238.

Deviations:
- The number of heads is set by the user (`num_experts`); upstream can also pick it by k-means / DBSCAN on the data.
- The router reads the input without dropout and its weights and logits are float32 (upstream casts only the softmax).
- One dropout mask per token, shared by all heads, and A applied once: upstream recomputes A for every head and draws
  an independent dropout mask per head. Without dropout (eval, or `lora_dropout: 0`) the two are equal; in training
  with dropout the per-head noise differs (the expectation does not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import Example, MoeConfigError, MoeLoraConfig, MoeLoraLayer, MoeLoraTuner, register_method
from ..core.errors import check_bool
from ..core.experts import routed_up_projection
from ..core.routing import cv_squared, masked_mean


@dataclass
class HydraLoRAConfig(MoeLoraConfig):
    """HydraLoRA: shared A, N routed B heads, dense softmax router (module docstring)."""

    method_name: ClassVar[str] = "hydralora"
    listing_order: ClassVar[int] = 70
    examples: ClassVar[tuple[Example, ...]] = (
        Example("hydralora", dict(num_experts=3, expert_rank=2), dict(moe_num_experts=3, lora_rank=2)),
        Example("hydralora-balance",
                dict(num_experts=3, expert_rank=2, head_balance_loss=True),
                dict(moe_num_experts=3, lora_rank=2, moe_head_balance_loss=True)),
    )
    shared_fields: ClassVar[tuple[str, ...]] = ("num_experts", "expert_rank", "lora_alpha", "expert_dropout",
                                                 "aux_loss_coef")
    aux_loss_terms: ClassVar[tuple[str, ...]] = ("balance_loss",)
    default_aux_loss_coef: ClassVar[float] = 1e-2  # used only with `head_balance_loss`

    num_experts: int = field(
        default=4, metadata={"help": "N: number of up-projection heads B_j sharing one A (HydraLoRA example: 4)."}
    )
    top_k: Optional[int] = field(
        default=None, metadata={"help": "Must stay None: the HydraLoRA router is a dense softmax over all heads."}
    )
    head_balance_loss: bool = field(
        default=False,
        metadata={"help": "Add aux_loss_coef * cv^2 of the mean router probability per head (importance balance, "
                          "Shazeer et al. 2017). Off by default: the official code has no auxiliary loss."},
    )

    def validate(self) -> None:
        super().validate()
        m = self.method_name
        if self.top_k is not None:
            raise MoeConfigError("top_k", self.top_k, "must be None: the router is a dense softmax over all heads",
                                 "remove `top_k`", method=m)
        check_bool("head_balance_loss", self.head_balance_loss, method=m)


class HydraLoRALayer(MoeLoraLayer):
    adapter_layer_names = ("hydralora_A", "hydralora_B", "hydralora_router")
    up_expert_name = "hydralora_B"  # the heads B_j (column blocks of B); the shared A is the same for every head
    fuses_residual = True

    def create_adapter(self, adapter_name: str, config: HydraLoRAConfig) -> None:
        r, N = config.expert_rank, config.num_experts
        self.hydralora_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))  # (r, in), shared
        self.hydralora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, N * r))  # (out, N*r)
        self.hydralora_router[adapter_name] = nn.Parameter(torch.empty(N, self.in_features))  # (N, in)

    @torch.no_grad()
    def reset_adapter(self, adapter_name: str, config: HydraLoRAConfig) -> None:
        nn.init.kaiming_uniform_(self.hydralora_A[adapter_name], a=math.sqrt(5))  # U(+-1/sqrt(in))
        nn.init.kaiming_uniform_(self.hydralora_router[adapter_name], a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.hydralora_B[adapter_name])
        else:
            nn.init.kaiming_uniform_(self.hydralora_B[adapter_name], a=math.sqrt(5))

    def adapter_delta(self, adapter_name: str, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
        config: HydraLoRAConfig = self.moe_config[adapter_name]
        # Router in float32: a low-precision softmax over heads loses the small differences routing depends on.
        router_logits = F.linear(x.float(), self.hydralora_router[adapter_name].float())  # (N_tok, N)
        routing_weights = torch.softmax(router_logits, dim=-1)
        token_mask = self.token_mask(x.shape[0])
        if self.training and config.head_balance_loss:  # record_aux keeps it only in training
            weights = None if token_mask is None else self.token_weights(token_mask, routing_weights)
            importance = masked_mean(routing_weights, weights)  # (N,)
            self.record_aux("balance_loss", cv_squared(importance), config.effective_aux_loss_coef)
        self.record_routing(routing_weights, None, token_mask)  # dense: every head selected
        code = F.linear(self.moe_dropout[adapter_name](x), self.hydralora_A[adapter_name])  # (N_tok, r), once
        return routed_up_projection(code, self.hydralora_B[adapter_name], routing_weights, config.scaling, residual)


class HydraLoRAModel(MoeLoraTuner):
    prefix = "hydralora_"
    tuner_layer_cls = HydraLoRALayer


register_method(HydraLoRAConfig, HydraLoRAModel)
