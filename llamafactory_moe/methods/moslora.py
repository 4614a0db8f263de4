"""MoSLoRA: Mixture-of-Subspaces in Low-Rank Adaptation (Wu et al., 2024, https://arxiv.org/abs/2406.11909).

Plain LoRA with a learnable r x r mixer W_m between the down- and up-projection, which fuses the r rank-one subspaces
of B A with each other instead of pairing them one to one:

    y  = W0 x + (alpha / r) * B W_m A dropout(x)          A: r x in,  W_m: r x r,  B: out x r
    dW = (alpha / r) * B W_m A                           (input-independent, so the adapter merges into W0)

Init: A and W_m Kaiming-uniform(a=sqrt(5)), i.e. U(+-1/sqrt(in)) and U(+-1/sqrt(r)); B zeros (identity at init).
There is no router and no auxiliary loss: the "mixture" is a dense learned mixer, not token routing.

Reference code: wutaiqiang/MoSLoRA@bba79b549174.

Deviations: none from the spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import Example, MoeConfigError, MoeLoraConfig, MoeLoraLayer, MoeLoraTuner, register_method
from ..core.experts import up_projection


@dataclass
class MoSLoRAConfig(MoeLoraConfig):
    """MoSLoRA: LoRA with a learnable r x r subspace mixer; mergeable (module docstring)."""

    method_name: ClassVar[str] = "moslora"
    listing_order: ClassVar[int] = 80
    examples: ClassVar[tuple[Example, ...]] = (
        Example("moslora", dict(expert_rank=4), dict(lora_rank=4)),
    )
    shared_fields: ClassVar[tuple[str, ...]] = ("expert_rank", "lora_alpha", "expert_dropout")
    supports_merge: ClassVar[bool] = True
    has_router: ClassVar[bool] = False

    num_experts: int = field(default=1, metadata={"help": "Must stay 1: MoSLoRA is a single adapter."})
    top_k: Optional[int] = field(default=None, metadata={"help": "Must stay None: MoSLoRA has no router."})

    def validate(self) -> None:
        super().validate()
        m = self.method_name
        if self.num_experts != 1:
            raise MoeConfigError("num_experts", self.num_experts, "must be 1: MoSLoRA has one A, one mixer, one B",
                                 "remove `num_experts`; use `expert_rank` for capacity", method=m)
        if self.top_k is not None:
            raise MoeConfigError("top_k", self.top_k, "must be None: MoSLoRA has no router", "remove `top_k`",
                                 method=m)
        if self.aux_loss_coef is not None:
            raise MoeConfigError("aux_loss_coef", self.aux_loss_coef, "must be None: MoSLoRA has no auxiliary loss",
                                 "remove `aux_loss_coef`", method=m)


class MoSLoRALayer(MoeLoraLayer):
    adapter_layer_names = ("moslora_A", "moslora_mixer", "moslora_B")
    fuses_residual = True

    def create_adapter(self, adapter_name: str, config: MoSLoRAConfig) -> None:
        r = config.expert_rank
        self.moslora_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))  # (r, in)
        self.moslora_mixer[adapter_name] = nn.Parameter(torch.empty(r, r))  # (r, r): W_m
        self.moslora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r))  # (out, r)

    @torch.no_grad()
    def reset_adapter(self, adapter_name: str, config: MoSLoRAConfig) -> None:
        nn.init.kaiming_uniform_(self.moslora_A[adapter_name], a=math.sqrt(5))  # U(+-1/sqrt(in))
        nn.init.kaiming_uniform_(self.moslora_mixer[adapter_name], a=math.sqrt(5))  # U(+-1/sqrt(r))
        if config.init_weights:
            nn.init.zeros_(self.moslora_B[adapter_name])
        else:
            nn.init.kaiming_uniform_(self.moslora_B[adapter_name], a=math.sqrt(5))

    def adapter_delta(self, adapter_name: str, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
        config: MoSLoRAConfig = self.moe_config[adapter_name]
        code = F.linear(self.moe_dropout[adapter_name](x), self.moslora_A[adapter_name])  # (N_tok, r)
        mixed = F.linear(code, self.moslora_mixer[adapter_name]) * config.scaling  # (N_tok, r): s W_m A x
        return up_projection(mixed, self.moslora_B[adapter_name], residual)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``(alpha / r) * B W_m A`` as ``(out, in)``, computed in float32 (the caller casts to the base dtype)."""
        config: MoSLoRAConfig = self.moe_config[adapter_name]
        A = self.moslora_A[adapter_name].float()
        mixer = self.moslora_mixer[adapter_name].float()
        B = self.moslora_B[adapter_name].float()
        return (B @ (mixer @ A)) * config.scaling


class MoSLoRAModel(MoeLoraTuner):
    prefix = "moslora_"
    tuner_layer_cls = MoSLoRALayer


register_method(MoSLoRAConfig, MoSLoRAModel)
