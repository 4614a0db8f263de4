"""GOAT: Great LoRA Mixture-of-Experts (Fan et al., ICML 2025, "Make LoRA Great Again: Boosting LoRA with Adaptive
Singular Values and Mixture-of-Experts Optimization Alignment", https://arxiv.org/abs/2502.16894).

Each wrapped linear W0 (out x in) gets E rank-r experts initialised from E segments of its spectrum, a router W_g
(E x in), and a residual-corrected base so the layer starts equal to W0 in expectation over routing:

    W0 = U diag(sigma) V^T,  t = min(out, in) // E,  I_e = {e*t, ..., e*t + r - 1}       (top r triplets of block e)
    sigma~ = sigma_I / (s * rho),  A_e = diag(sqrt(sigma~_Ie)) V_Ie^T,  B_e = U_Ie diag(sqrt(sigma~_Ie))
    W_res  = W0 - c * s * sum_e B_e^0 A_e^0                               (c = 1/E: E[w_e] = 1/E under uniform routing)
    p(x)   = softmax(W_g x),  w(x) = top-k of p(x) renormalised               (float32)
    y      = W_res x + s * sum_e w_e(x) * B_e A_e dropout(x)
    L_aux  = aux_loss_coef * E * sum_e f_e * P_e                             (Switch balance, summed over layers)

The scale s is alpha / r (what the shipped scripts use) or the paper's gradient-alignment closed form
s = sqrt(3 * eta * in / r) (`scaling_mode`).

Reference code: Facico/GOAT-PEFT@ef4d21a41682.

Deviations:
- W_res is applied in forward as ``base(x) - c*s*B0 (A0 x)`` from persistent buffers holding the initial segments
  (A0: (E*r, in), B0: (out, E*r)) instead of editing W0 in place. Cost: two extra GEMMs of inner size E*r per layer
  (the size of one more expert pair; ~0.2% of the base GEMM at in=out=4096, E*r=8) and 2*E*r*(in+out) stored values.
  In exchange: reload is bit-exact with no SVD (upstream re-runs one SVD per matrix at every load and is not
  bit-identical, §2.10.5), bf16 base weights are not rounded by the subtraction, ZeRO-3 never re-partitions a modified
  W0, and `disable_adapter()` gives the pristine base model.
- Saved adapter configs carry `svd_init: false`: the checkpoint holds the trained experts and the initial segments,
  so `PeftModel.from_pretrained` skips the SVD (peft does the same for converted PiSSA adapters).
- The gradient-alignment scale works with the SVD init (upstream raises NotImplementedError for it, §2.10.1).
- Experts run as one stacked GEMM pair with a dense top-k gate (no per-expert loop, no extra expert-0 pass, §2.10.2-3).
- The balance loss ignores padding tokens (upstream counts them, §2.10.4). One dropout mask is shared by all experts
  (upstream draws one per expert).
- A layer whose min(out, in) < E*r raises an error (upstream silently leaves it unwrapped).
- Top-k ties go to the lower expert index (a stable descending sort, core.routing.top_k_keep_bias); upstream's
  `torch.topk` leaves the order of equal scores unspecified (it may differ by device). Only exactly equal scores
  are affected.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.utils.integrations import gather_params_ctx

from ..core import Example, MoeLoraConfig, MoeLoraLayer, MoeLoraTuner, register_method
from ..core.errors import MoeConfigError, check_bool, check_choice, check_float
from ..core.experts import paired_experts

logger = logging.getLogger(__name__)

SCALING_MODES = ("alpha", "gradient_alignment")


@dataclass
class GoatConfig(MoeLoraConfig):
    """GOAT: SVD-segment experts, residual-corrected base, top-k routing (module docstring; spec §2)."""

    method_name: ClassVar[str] = "goat"
    listing_order: ClassVar[int] = 50
    examples: ClassVar[tuple[Example, ...]] = (
        Example("goat-top2",
                dict(num_experts=4, top_k=2, expert_rank=2),
                dict(moe_num_experts=4, moe_top_k=2, lora_rank=2)),
        Example("goat-gradient-alignment",
                dict(num_experts=4, top_k=2, expert_rank=1, scaling_mode="gradient_alignment"),
                dict(moe_num_experts=4, moe_top_k=2, lora_rank=1, moe_scaling_mode="gradient_alignment")),
    )
    identity_at_init: ClassVar[bool] = False  # equals the base only in expectation over uniform routing
    modifies_base_weights: ClassVar[bool] = True  # the effective base is W_res (applied as a forward correction)
    aux_loss_terms: ClassVar[tuple[str, ...]] = ("balance_loss",)
    default_aux_loss_coef: ClassVar[float] = 1e-3  # every shipped GOAT script

    num_experts: int = field(default=8, metadata={"help": "Number of LoRA experts per wrapped layer (GOAT: 8)."})
    top_k: Optional[int] = field(default=2, metadata={"help": "Experts per token (GOAT: 2); None = all experts."})
    svd_init: bool = field(
        default=True,
        metadata={"help": "True: initialise expert e from the e-th block of W0's singular values and correct the base "
                          "by the initial update (GOAT). False: Kaiming A, zero B, no correction (plain MoE-LoRA). "
                          "Saved adapters store false, since their weights and correction come from the checkpoint."},
    )
    svd_shrink: float = field(
        default=10.0,
        metadata={"help": "rho: the SVD segments are divided by (scale * rho), so each expert starts as 1/rho of its "
                          "spectral slice (GOAT hard-codes 10)."},
    )
    residual_coef: Optional[float] = field(
        default=None,
        metadata={"help": "c in W_res = W0 - c * scale * sum_e B_e A_e (`init_cof` upstream); None = 1/num_experts, "
                          "which makes the initial layer equal W0 in expectation over uniform routing."},
    )
    scaling_mode: str = field(
        default="alpha",
        metadata={"help": "Expert scale s. 'alpha': lora_alpha / expert_rank (the shipped scripts). "
                          "'gradient_alignment': the paper's closed form sqrt(3 * scaling_eta * in_features / "
                          "expert_rank), per layer; lora_alpha is then unused."},
    )
    scaling_eta: float = field(
        default=1.0,
        metadata={"help": "eta in the gradient-alignment scale (the ratio of the LoRA and full fine-tuning learning "
                          "rates in the paper's derivation; upstream env ETA). Used only with "
                          "scaling_mode='gradient_alignment'."},
    )

    def validate(self) -> None:
        super().validate()
        m = self.method_name
        check_bool("svd_init", self.svd_init, method=m)
        check_float("svd_shrink", self.svd_shrink, minimum=0.0, min_exclusive=True, method=m)
        if self.residual_coef is not None:
            check_float("residual_coef", self.residual_coef, minimum=0.0, method=m)
        check_choice("scaling_mode", self.scaling_mode, SCALING_MODES, method=m)
        check_float("scaling_eta", self.scaling_eta, minimum=0.0, min_exclusive=True, method=m)

    @property
    def effective_residual_coef(self) -> float:
        return 1.0 / self.num_experts if self.residual_coef is None else float(self.residual_coef)

    def layer_scaling(self, in_features: int) -> float:
        if self.scaling_mode == "gradient_alignment":
            return math.sqrt(3.0 * self.scaling_eta * in_features / self.expert_rank)
        return self.scaling

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        # The checkpoint holds the trained experts and the initial segments (buffers): loading it must not run the SVD.
        saved = copy.copy(self)
        saved.svd_init = False
        super(GoatConfig, saved).save_pretrained(save_directory, **kwargs)


def svd_segments(weight: torch.Tensor, num_experts: int, expert_rank: int, divisor: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """GOAT's expert init: the top ``expert_rank`` singular triplets of each of ``num_experts`` spectrum blocks.

    Returns fp32 ``A: (E*r, in)`` and ``B: (out, E*r)`` with ``B_e A_e = U_Ie diag(sigma_Ie / divisor) V_Ie^T``.
    """
    U, sigma, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)  # thin SVD, sigma descending
    block = sigma.numel() // num_experts
    index = (torch.arange(num_experts, device=sigma.device)[:, None] * block
             + torch.arange(expert_rank, device=sigma.device)[None, :]).reshape(-1)  # (E*r,), expert-major
    root = (sigma[index] / divisor).sqrt()
    return root[:, None] * Vh[index], U[:, index] * root[None, :]


def _broadcast_from_rank0(*tensors: torch.Tensor) -> None:
    """Make every data-parallel rank hold rank 0's values (DeepSpeed broadcasts parameters, not buffers)."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    for tensor in tensors:
        staged = tensor if device is None else tensor.to(device)
        dist.broadcast(staged, src=0)
        if staged is not tensor:
            tensor.copy_(staged)


def _is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GoatLayer(MoeLoraLayer):
    adapter_layer_names = ("goat_A", "goat_B", "goat_router")
    paired_expert_names = ("goat_A", "goat_B")
    buffer_names = ("goat_A_init", "goat_B_init")
    fuses_residual = True

    def create_adapter(self, adapter_name: str, config: GoatConfig) -> None:
        total_rank = config.num_experts * config.expert_rank
        if total_rank > min(self.in_features, self.out_features):
            # Known only once the layer's shape is: raised while the model is built, still as a one-line error.
            raise MoeConfigError(
                "num_experts", config.num_experts,
                f"times `expert_rank` ({config.expert_rank}) is {total_rank}: GOAT splits the spectrum of "
                f"`{self.moe_layer_name}` ({self.out_features} x {self.in_features}) into blocks of singular triplets, "
                f"which needs num_experts * expert_rank <= {min(self.in_features, self.out_features)}",
                "lower `expert_rank` / `num_experts` or leave this module out of `target_modules`")
        self.goat_A[adapter_name] = nn.Parameter(torch.empty(total_rank, self.in_features))  # (E*r, in)
        self.goat_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, total_rank))  # (out, E*r)
        self.goat_router[adapter_name] = nn.Parameter(torch.empty(config.num_experts, self.in_features))  # (E, in)
        self.goat_A_init[adapter_name] = torch.zeros(total_rank, self.in_features)  # (E*r, in): A^0 for W_res
        self.goat_B_init[adapter_name] = torch.zeros(self.out_features, total_rank)  # (out, E*r): B^0 for W_res

    @torch.no_grad()
    def reset_adapter(self, adapter_name: str, config: GoatConfig) -> None:
        A, B = self.goat_A[adapter_name], self.goat_B[adapter_name]
        nn.init.kaiming_uniform_(self.goat_router[adapter_name], a=math.sqrt(5))  # torch's Linear default, as upstream
        if config.svd_init and A.device.type != "meta":  # meta: low_cpu_mem_usage, values come from the checkpoint
            A_init, B_init = self.goat_A_init[adapter_name], self.goat_B_init[adapter_name]
            divisor = config.layer_scaling(self.in_features) * config.svd_shrink
            weight = self.get_base_layer().weight
            # Under ZeRO-3 the weight is partitioned: gather it read-only (W0 itself is never modified).
            with gather_params_ctx(weight, modifier_rank=None):
                if not _is_distributed() or torch.distributed.get_rank() == 0:
                    segments = svd_segments(weight, config.num_experts, config.expert_rank, divisor)
                    A_init.copy_(segments[0])
                    B_init.copy_(segments[1])
            if _is_distributed():
                _broadcast_from_rank0(A_init, B_init)
            A.copy_(A_init)
            B.copy_(B_init)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)
        if not config.init_weights:  # tests: random experts, so outputs and gradients are non-trivial
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))

    def adapter_delta(self, adapter_name: str, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
        config: GoatConfig = self.moe_config[adapter_name]
        scaling = config.layer_scaling(self.in_features)
        # Router in float32: a bf16 softmax over experts loses the small differences top-k depends on.
        router_logits = F.linear(x.float(), self.goat_router[adapter_name].float())  # (N, E)
        # softmax, top-k, renormalise; the Switch balance loss in training (core.layer.MoeLoraLayer.switch_route)
        routing_weights = self.switch_route(router_logits, config.top_k, config.effective_aux_loss_coef)
        experts = paired_experts(self.moe_dropout[adapter_name](x), self.goat_A[adapter_name],
                                 self.goat_B[adapter_name], routing_weights, config.expert_rank, scaling, residual)
        # W_res x - W0 x = -c * s * B0 (A0 x): the base path sees the input without dropout.
        A_init = self.goat_A_init[adapter_name].to(x.dtype)
        B_init = self.goat_B_init[adapter_name].to(x.dtype)
        # (residual +) s * experts - s * c * B0 (A0 x): the correction joins the sum inside one more addmm (alpha
        # scales the product), so the coefficient and the subtraction cost no kernels of their own.
        return torch.addmm(experts, F.linear(x, A_init), B_init.t(), alpha=-scaling * config.effective_residual_coef)


class GoatModel(MoeLoraTuner):
    prefix = "goat_"
    tuner_layer_cls = GoatLayer

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        # Log the one-off SVD cost once per adapter (it dominates injection time on a 7B model).
        start = time.perf_counter()
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        config = self.peft_config[adapter_name]
        if config.svd_init and (not _is_distributed() or torch.distributed.get_rank() == 0):
            count = sum(isinstance(m, GoatLayer) and adapter_name in m.goat_A for m in model.modules())
            logger.info("GOAT: SVD-initialised %d weight matrices in fp32 in %.1f s", count,
                        time.perf_counter() - start)


register_method(GoatConfig, GoatModel)
