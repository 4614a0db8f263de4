"""SMoRA: "Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for Multi-task Learning"
(Zhao, Zhou et al., arXiv 2501.15103; https://arxiv.org/abs/2501.15103).

One LoRA of rank r in which every rank-1 component B_{:,j} A_j is an expert. A sigmoid router scores the ranks, a
per-rank bias b steers which k ranks a token uses, and the update is a k-sparse diagonal gate between B and A:

    x~     = dropout(x)                                  (the same x~ feeds the router and A)
    s(x)   = sigmoid(W_g x~)          (N, r/p), float32; each score repeated p = rank_partition times -> (N, r)
    I(x)   = top-k_j (s_j + b_j)                          (selection uses the biased scores)
    v_j    = s_j (+ b_j if gate_uses_bias)                for j in I(x)
    g_j    = k * v_j / sum_{i in I} v_i  for j in I, else 0   (the k gates average 1)
    y      = W0 x + (alpha / k) * B diag(g(x)) A x~      (uniform gates = a rank-k LoRA with scaling alpha / k)
           = W0 x + alpha * B diag(g_hat(x)) A x~         (g_hat = g / k sums to 1: what the code computes)

Loss-free balancing (Wang et al. 2024, as in DeepSeek-V3): no auxiliary loss. During the training forwards of one
optimizer step each layer counts c_j, the real (non-padding) tokens that selected rank j; after the step the counts are
summed over data-parallel ranks and every bias moves b_j <- b_j + u * sign(mean(c) - c_j), u = bias_update_rate.
LLaMA-Factory runs this after every optimizer step; a plain PyTorch loop forwards inside
``model.aux_loss_window(mask)`` and calls ``model.apply_optimizer_step_updates()`` after ``optimizer.step()``.

Expert compute is dense and masked: H = x~ A^T (N, r), times the k-sparse gate, times B^T (two GEMMs, no gather, no
loop over ranks); A: (r, in), B: (out, r) are the stacked form of r rank-1 experts.

Reference code: StyxXuan/smora@7e7ada17 (packages/peft/src/peft/tuners/srmole/).

Deviations (from the shipped code; spec §A.5 and §A.12):
* The bias is a frozen fp32 buffer, updated once per optimizer step from counts of non-padding tokens of the training
  forwards only (gradient-checkpointing recomputes and no-grad passes such as KTO's KL batch do not count), all-reduced
  across data-parallel ranks. Shipped: a parameter that `set_adapter` makes trainable (so AdamW also moves it), updated
  on every forward call (per micro-batch, twice with gradient checkpointing), counting padding, never synchronised.
  `bias_trainable=True` restores the trainable parameter; the per-forward schedule is not offered (it is approximated
  by multiplying `bias_update_rate` by the gradient-accumulation steps, x2 with gradient checkpointing).
* Gate values use the unbiased scores by default: the paper adopts loss-free balancing, where the bias only selects
  (spec §A.12 item 6 lists the leak of the bias into the gate as a bug); `gate_uses_bias=True` gives the shipped gate.
* The gate normaliser sum_{i in I} v_i is kept at least 1e-6 away from zero (unguarded upstream).
* `bias_update_rate` is configurable (hard-coded 1e-5 upstream); the unused `epsilon_greedy` and ignored
  `dense_compute` flags are dropped; the TVM gather kernels are replaced by the dense masked GEMMs above.
* Rank selection ties (equal biased scores, e.g. tied block scores with p > 1) go to the lower rank index (a stable
  descending sort); upstream's `torch.topk` leaves the order of equal scores unspecified.
* Keys are `smora_A`, `smora_B`, `smora_router`, `smora_bias` (`smora_trainable_bias` with `bias_trainable`);
  shipped: `lora_A.weight`, `lora_B.weight`, `lora_router.weight`, `lora_biases` under peft type SRMOLE.
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
from ..core.errors import MoeConfigError, check_bool, check_float, check_int
from ..core.experts import paired_experts
from ..core.routing import top_k_keep_bias

GATE_EPS = 1e-6  # keeps the gate normaliser away from 0 when biased scores cancel (gate_uses_bias=True)


@dataclass
class SMoRAConfig(MoeLoraConfig):
    """Single-ranked mixture of LoRA experts: `expert_rank` (LoRA rank r) rank-1 experts, `top_k` (k) active per token.

    The paper's setting is r=64, k=8, lora_alpha=16 (scaling alpha/k = 2). `num_experts` is not read: the experts are
    the r ranks, so it always mirrors `expert_rank`.
    """

    method_name: ClassVar[str] = "smora"
    listing_order: ClassVar[int] = 20
    examples: ClassVar[tuple[Example, ...]] = (
        Example("smora", dict(expert_rank=8, top_k=2, lora_alpha=4.0), dict(lora_rank=8, moe_top_k=2, lora_alpha=4)),
        Example("smora-as-shipped-gate",
                dict(expert_rank=8, top_k=3, rank_partition=2, gate_uses_bias=True, bias_update_rate=1e-3),
                dict(lora_rank=8, moe_top_k=3, moe_rank_partition=2, moe_gate_uses_bias=True,
                     moe_bias_update_rate=1e-3)),
    )
    shared_fields: ClassVar[tuple[str, ...]] = ("top_k", "expert_rank", "lora_alpha", "expert_dropout")

    expert_rank: int = field(default=64, metadata={"help": "LoRA rank r = number of rank-1 experts (`lora_rank`)."})
    top_k: Optional[int] = field(
        default=8, metadata={"help": "Ranks each token activates (the paper's `activate_r`); None = all r ranks."}
    )
    num_experts: Optional[int] = field(
        default=None, metadata={"help": "Not read by SMoRA: every one of the `expert_rank` ranks is an expert. Leave "
                                        "unset; it is filled with `expert_rank`."}
    )
    rank_partition: int = field(
        default=1, metadata={"help": "Ranks sharing one router score (p); the router outputs expert_rank / p scores. "
                                     "p > 1 emulates block-wise multi-LoRA MoE; selection stays per rank."}
    )
    bias_update_rate: float = field(
        default=1e-5, metadata={"help": "Loss-free balancing step u: after each optimizer step every rank bias moves "
                                        "by +-u toward under-used ranks. 0 disables balancing."}
    )
    bias_trainable: bool = field(
        default=False, metadata={"help": "False: the balancing bias is a frozen buffer (loss-free balancing). True: as "
                                         "shipped, the bias is also a trainable parameter (it only gets a gradient "
                                         "with `gate_uses_bias`)."}
    )
    gate_uses_bias: bool = field(
        default=False, metadata={"help": "False: the bias only selects ranks, gate values are the raw sigmoid scores "
                                         "(loss-free balancing). True: as shipped, gate values are the biased scores."}
    )

    def __post_init__(self):
        if self.num_experts is None:
            self.num_experts = self.expert_rank
        super().__post_init__()

    def validate(self) -> None:
        m = self.method_name
        check_int("expert_rank", self.expert_rank, minimum=1, method=m)
        if self.top_k is not None:
            check_int("top_k", self.top_k, minimum=1, method=m)
            if self.top_k > self.expert_rank:
                raise MoeConfigError("top_k", self.top_k, f"must be <= `expert_rank` ({self.expert_rank}), the number "
                                     "of rank experts", "lower `top_k` or raise `expert_rank`", method=m)
        if self.num_experts != self.expert_rank:
            raise MoeConfigError("num_experts", self.num_experts, f"is not used: the experts are the "
                                 f"`expert_rank` ({self.expert_rank}) ranks", "leave `num_experts` unset", method=m)
        super().validate()
        check_int("rank_partition", self.rank_partition, minimum=1, method=m)
        if self.expert_rank % self.rank_partition:
            divisors = [d for d in range(1, self.expert_rank + 1) if self.expert_rank % d == 0]
            raise MoeConfigError("rank_partition", self.rank_partition, f"must divide `expert_rank` "
                                 f"({self.expert_rank})", f"use one of {divisors}", method=m)
        check_float("bias_update_rate", self.bias_update_rate, minimum=0.0, method=m)
        check_bool("bias_trainable", self.bias_trainable, method=m)
        check_bool("gate_uses_bias", self.gate_uses_bias, method=m)
        if self.bias_trainable and not self.gate_uses_bias:
            warnings.warn("`bias_trainable=True` has no effect without `gate_uses_bias=True`: the bias then only "
                          "selects ranks and gets no gradient.", stacklevel=3)

    @property
    def active_ranks(self) -> int:
        return self.expert_rank if self.top_k is None else self.top_k

    @property
    def scaling(self) -> float:
        # alpha / k, not alpha / r: the k active gates average 1, so SMoRA matches a rank-k LoRA's scale.
        return self.alpha / self.active_ranks


class SMoRALayer(MoeLoraLayer):
    adapter_layer_names = ("smora_A", "smora_B", "smora_router", "smora_trainable_bias")
    paired_expert_names = ("smora_A", "smora_B")  # the r rank-1 experts: rows of A, columns of B
    buffer_names = ("smora_bias",)
    fuses_residual = True

    def __init__(self, *args, **kwargs) -> None:
        # adapter -> (r,) float32 tokens per rank since the last optimizer step (runtime state, never saved)
        self._rank_counts: dict[str, torch.Tensor] = {}
        super().__init__(*args, **kwargs)

    def create_adapter(self, adapter_name: str, config: SMoRAConfig) -> None:
        r = config.expert_rank
        self.smora_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))  # (r, in)
        self.smora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r))  # (out, r)
        self.smora_router[adapter_name] = nn.Parameter(
            torch.empty(r // config.rank_partition, self.in_features))  # (r/p, in)
        if config.bias_trainable:
            self.smora_trainable_bias[adapter_name] = nn.Parameter(torch.zeros(r))  # (r,)
        else:
            self.smora_bias[adapter_name] = torch.zeros(r)  # (r,) float32 buffer

    @torch.no_grad()
    def reset_adapter(self, adapter_name: str, config: SMoRAConfig) -> None:
        nn.init.kaiming_uniform_(self.smora_A[adapter_name], a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.smora_router[adapter_name], a=math.sqrt(5))  # nn.Linear's default
        if config.init_weights:
            nn.init.zeros_(self.smora_B[adapter_name])
        else:
            nn.init.kaiming_uniform_(self.smora_B[adapter_name], a=math.sqrt(5))
        self.rank_bias(adapter_name).zero_()
        self._rank_counts.pop(adapter_name, None)

    def rank_bias(self, adapter_name: str) -> torch.Tensor:
        """The (r,) balancing bias of an adapter (a buffer, or a parameter with `bias_trainable`)."""
        if adapter_name in self.smora_trainable_bias:
            return self.smora_trainable_bias[adapter_name]
        return self.smora_bias[adapter_name]

    def route(self, adapter_name: str, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Normalised gates ``g_hat (N, r)`` float32 (k non-zero per token, summing to 1) and the float 0/1 ``(N, r)``
        selection (None when neither training nor routing logs need it)."""
        config: SMoRAConfig = self.moe_config[adapter_name]
        # Router in float32: the sign-step bias (1e-5) must be able to reorder sigmoid scores.
        logits = F.linear(x, self.smora_router[adapter_name]).float()  # (N, r/p)
        if config.rank_partition > 1:
            logits = logits.repeat_interleave(config.rank_partition, dim=-1)  # (N, r)
        bias = self.rank_bias(adapter_name).float()
        # 0 on the k selected ranks, -inf on the others; ties (tied block scores with p > 1, zero bias at init) go to
        # the lower rank.
        with torch.no_grad():
            keep_bias = top_k_keep_bias(torch.sigmoid(logits) + bias, config.active_ranks)
        selected = keep_bias.exp() if self.wants_routing_statistics() or config.gate_uses_bias else None
        if config.gate_uses_bias:
            # As shipped: the biased scores are the gate values. They can be negative, so the sum is kept away from 0
            # on its own side.
            kept = (torch.sigmoid(logits) + bias) * selected
            total = kept.sum(dim=-1, keepdim=True)
            return kept / torch.where(total >= 0, total.clamp_min(GATE_EPS), total.clamp_max(-GATE_EPS)), selected
        # Sigmoid scores normalised over the selected ranks, s_j / sum_sel s = a softmax of log s_j over them: one
        # kernel each way, and log-sigmoid stays finite where sigmoid underflows, so the sum never vanishes.
        return torch.softmax(F.logsigmoid(logits) + keep_bias, dim=-1), selected

    def adapter_delta(self, adapter_name: str, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
        config: SMoRAConfig = self.moe_config[adapter_name]
        x = self.moe_dropout[adapter_name](x)  # as shipped: the router sees the dropped input too
        gates, selected = self.route(adapter_name, x)
        token_mask = self.token_mask(x.shape[0])
        if config.bias_update_rate > 0 and self.records_training_statistics():
            self._count_ranks(adapter_name, selected, token_mask)
        self.record_routing(gates, selected, token_mask)
        # r experts of rank 1: (x~ A^T) * g_hat, then B^T — H = x~ A^T is (N, r), the gate zeroes the unselected
        # ranks. (alpha / k) * B diag(k g_hat) A x~ = alpha * B diag(g_hat) A x~: one scale, applied once.
        return paired_experts(x, self.smora_A[adapter_name], self.smora_B[adapter_name], gates, 1,
                              config.scaling * config.active_ranks, residual)

    # -- loss-free balancing: count during the step's training forwards, update once after the optimizer step --------
    @torch.no_grad()
    def _count_ranks(self, adapter_name: str, selected: torch.Tensor, token_mask: Optional[torch.Tensor]) -> None:
        chosen = selected.float()
        # (N,) @ (N, r) -> (r,): tokens per rank, padding weighted 0 (no boolean indexing, no host sync).
        counts = chosen.sum(0) if token_mask is None else token_mask.float() @ chosen
        previous = self._rank_counts.get(adapter_name)
        self._rank_counts[adapter_name] = counts if previous is None else previous + counts

    def _balanced_adapters(self) -> list[str]:
        # Same list on every data-parallel rank (configs are identical), so the all-reduce lines up.
        return sorted(name for name, config in self.moe_config.items()
                      if isinstance(config, SMoRAConfig) and config.bias_update_rate > 0 and name in self.smora_A)

    def step_statistics(self) -> list[torch.Tensor]:
        stats = []
        for name in self._balanced_adapters():
            bias = self.rank_bias(name)
            counts = self._rank_counts.get(name)
            stats.append(torch.zeros(bias.shape, device=bias.device) if counts is None else counts)
        return stats

    @torch.no_grad()
    def apply_step_statistics(self, reduced: list[torch.Tensor]) -> None:
        for name, counts in zip(self._balanced_adapters(), reduced):
            bias = self.rank_bias(name)
            # b_j += u * sign(mean(c) - c_j): under-used ranks (c_j below the mean) gain selection priority.
            step = self.moe_config[name].bias_update_rate * torch.sign(counts.mean() - counts)
            bias.add_(step.to(device=bias.device, dtype=bias.dtype))
        self._rank_counts.clear()

    # -- keep the balancing bias in float32 (a 1e-5 step vanishes in bf16) -------------------------------------------
    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        kept = dict(self.smora_bias.items())
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)  # casts buffers to the base dtype
        self._restore_fp32_bias(kept)

    def _apply(self, fn, recurse=True):
        kept = dict(getattr(self, "smora_bias", {}).items())
        super()._apply(fn, recurse)  # model.to(torch.bfloat16) casts every floating buffer
        self._restore_fp32_bias(kept)
        return self

    def _restore_fp32_bias(self, kept: dict[str, torch.Tensor]) -> None:
        for name, bias in kept.items():
            self.smora_bias[name] = bias.to(device=self.smora_bias[name].device, dtype=torch.float32)


class SMoRAModel(MoeLoraTuner):
    prefix = "smora_"
    tuner_layer_cls = SMoRALayer


register_method(SMoRAConfig, SMoRAModel)
