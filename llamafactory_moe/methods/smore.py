"""S'MoRE: "Structural Mixture of Residual Experts for Parameter-Efficient LLM Fine-tuning" (Zeng et al., NeurIPS 2025;
https://arxiv.org/abs/2504.06426), Eq. 3-7, 10, 11.

One file over ~400 lines on purpose: the paper's hierarchy (tree router, per-layer experts, bottom-up aggregation,
two gate types) reads top to bottom here, like every other method file; its shared parts already live in ``core/``.

Experts are low-rank residuals in L S'MoRE layers (index l = 0 is the bottom). Layer l has s_l experts of rank r_l;
hidden dims d_0 = 0, d_{l+1} = d_l + s_l r_l (Eq. 4). Per wrapped Linear (in -> out):

    route top-down (Eq. 6-7): q = W_down x; gate l picks f_l children for every parent from MLP_l(concat(q, keys of
                              all ancestors)); alpha = the gate's scores          (a tree of depth L per token)
    expert e of layer l:      z = c_l (B_l^e (A_l^e x + a_l^e) + b_l^e)           (c_l = layer_lora_alpha_l / r_l or 1)
    aggregate bottom-up (Eq. 3): x_{l+1}^i = sum_{n in children(i)} alpha^{i,n} sigma(z_n + W_l x_l^n + w_l)
    output:                   y = W0 x + W_proj x_L + b_proj
    aux (Eq. 11), per gate:   aux_loss_coef * (switch: s_l sum_e f_e P_e | noisy top-k: CV²(importance) + CV²(load))

Variants: S'MoRE* (Eq. 10, ``activation_position="child_v2"``: sigma on the children's states), the code-only
``child`` position (alpha scales only z), S'MoRE# (``shared_expert_pool``: one pool of experts for every layer). With
L = 1 and identity sigma it is a MixLoRA-style MoE whose up-projections live in W_proj (``eq_1_layer`` init, Prop. 3.2).

Compute: every layer evaluates all its experts with two batched matmuls and gathers the tree nodes from the expert axis;
the only Python loops run over the L S'MoRE layers.

Reference code: ZimpleX/SMoRE-LLM@3d293498 (peft/src/peft/tuners/hier_moe, model_moe/src/model_moe/moe).

Deviations (spec §B.13):
* The layer returns a tensor and records its balance losses in the loss window: no modeling-file patches, any
  causal LM, attention projections targetable. Shipped: structured outputs and swapped LLaMA/Gemma-2 model classes.
* Padding is masked with the trainer's token mask, never the attention mask, and balance losses are computed in
  training only, so batched KV-cache generation works for every gate and eval loss has no balance term (shipped: sparse
  gates crash under KV cache, eval loss includes the balance loss). Gradient-accumulation scaling is the trainer's.
* S'MoRE#: expert outputs are computed once per forward and reused by every layer (the paper's footnote); shipped code
  recomputes them per layer. Same numbers.
* Defaults: ``init_method="w_final_zero"`` (the README's intent; shipped config default ``b_zero``) and ``gate_type=
  "switch"``; ``router_down_dim=None`` feeds x to the routers unprojected.
* ``gate_type="noisy_topk"`` with ``gate_arch="linear"`` is rejected (shipped: silently uses the MLP query); the
  ``bottom_up`` / ``mixlora`` archs (unimplemented upstream) and the ``tree`` / ``loop`` forward modes are not offered.
* ``expert_dropout`` (``lora_dropout``) drops the experts' input, default 0 (shipped: none).
* The switch and noisy top-k gates break ties by the lower expert index (a stable descending sort); upstream's
  `torch.topk` leaves the order of equal scores unspecified.
* Parameters live flat in two dicts, ``smore_experts`` and ``smore_router`` (shipped keys: ``moe_A.{l}`` ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Mapping, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import Example, MoeLoraConfig, MoeLoraLayer, MoeLoraTuner, register_method
from ..core.errors import MoeConfigError, check_bool, check_choice, check_float, check_int
from ..core.experts import gather_experts
from ..core.routing import cv_squared, pairwise_rank_fuses, switch_balance_loss, top_k_indices, top_k_one_hot

GATE_TYPES = ("switch", "noisy_topk", "dense")
GATE_ARCHS = ("mlp", "linear")
ACTIVATION_POSITIONS = ("all", "child_v2", "child")
INIT_METHODS = ("w_final_zero", "eq_1_layer", "normal", "b_zero", "bw_zero")
ACTIVATIONS = ("identity", "tanh", "relu", "prelu")
NOISE_FLOOR = 0.01  # Shazeer et al. 2017: noise std = softplus(W_noise q) + 0.01


def parse_activation(field_name: str, spec, method: str = "smore") -> tuple[str, float]:
    """``"tanh"`` -> ("tanh", 0.0); ``"prelu"`` / ``"prelu|0.1"`` -> ("prelu", initial slope, default 0.25)."""
    name, _, slope = str(spec).partition("|")
    if not isinstance(spec, str) or name not in ACTIVATIONS or (slope and name != "prelu"):
        raise MoeConfigError(field_name, spec, "must be one of 'identity', 'tanh', 'relu', 'prelu' or "
                             "'prelu|<initial slope>'", method=method)
    try:
        return name, float(slope) if slope else 0.25
    except ValueError:
        raise MoeConfigError(field_name, spec, "has a PReLU slope that is not a number", "write e.g. 'prelu|0.25'",
                             method=method) from None


def activate(name: str, t: torch.Tensor, slope: Optional[torch.Tensor]) -> torch.Tensor:
    if name == "tanh":
        return torch.tanh(t)
    if name == "relu":
        return torch.relu(t)
    if name == "prelu":
        return F.prelu(t, slope.to(t.dtype))
    return t


@dataclass
class SMoREConfig(MoeLoraConfig):
    """S'MoRE: per-S'MoRE-layer lists (index 0 = bottom). The shared `num_experts`, `top_k`, `expert_rank` and
    `lora_alpha` are not read; see `layer_num_experts`, `layer_top_k`, `layer_ranks`, `layer_lora_alpha`."""

    method_name: ClassVar[str] = "smore"
    listing_order: ClassVar[int] = 30
    examples: ClassVar[tuple[Example, ...]] = (
        Example("smore-switch",
                dict(layer_num_experts=[3, 2], layer_top_k=[2, 1], layer_ranks=[2, 3], gate_dims=[8],
                     router_down_dim=8),
                dict(moe_layer_num_experts=[3, 2], moe_layer_top_k=[2, 1], moe_layer_ranks=[2, 3], moe_gate_dims=[8],
                     moe_router_down_dim=8)),
        Example("smore-noisy-shared-pool",
                dict(layer_num_experts=[3, 3], layer_top_k=[2, 2], layer_ranks=[2, 2], gate_type="noisy_topk",
                     shared_expert_pool=True, activation_position="child_v2", gate_dims=[8], router_down_dim=8),
                dict(moe_layer_num_experts=[3, 3], moe_layer_top_k=[2, 2], moe_layer_ranks=[2, 2],
                     moe_gate_type="noisy_topk", moe_shared_expert_pool=True, moe_activation_position="child_v2",
                     moe_gate_dims=[8], moe_router_down_dim=8)),
        Example("smore-dense-eq-1-layer",
                dict(layer_num_experts=[2, 2], layer_top_k=[2, 2], layer_ranks=[2, 2], gate_type="dense",
                     init_method="eq_1_layer", gate_dims=[8], router_down_dim=8),
                dict(moe_layer_num_experts=[2, 2], moe_layer_top_k=[2, 2], moe_layer_ranks=[2, 2],
                     moe_gate_type="dense", moe_init_method="eq_1_layer", moe_gate_dims=[8], moe_router_down_dim=8)),
    )
    shared_fields: ClassVar[tuple[str, ...]] = ("expert_dropout", "aux_loss_coef")
    # Every init but `normal` zeroes W_proj or B, and sigma(0) = 0 for every activation.
    identity_at_init: ClassVar[bool] = True
    aux_loss_terms: ClassVar[tuple[str, ...]] = ("balance_loss", "importance_loss", "load_loss")
    default_aux_loss_coef: ClassVar[float] = 1e-2  # per gate, as shipped (`balance_loss_weight`)

    layer_num_experts: list[int] = field(
        default_factory=lambda: [4, 4],
        metadata={"help": "Experts s_l in each S'MoRE layer (index 0 = bottom); its length is the depth L."})
    layer_top_k: list[int] = field(
        default_factory=lambda: [2, 2],
        metadata={"help": "Fan-out f_l: children each parent picks in layer l (ignored by the dense gate)."})
    layer_ranks: list[int] = field(
        default_factory=lambda: [8, 8],
        metadata={"help": "Expert rank r_l of each layer; the root state has d_L = sum_l s_l r_l dims."})
    layer_lora_alpha: Optional[list[float]] = field(
        default=None,
        metadata={"help": "Per-layer alpha: expert outputs of layer l are scaled by alpha_l / r_l. One value is "
                          "broadcast. None = scale 1 (as shipped)."})
    gate_dims: list[int] = field(
        default_factory=lambda: [32],
        metadata={"help": "Query/key dim m_l of each layer's gate MLP; one value is broadcast (unused by "
                          "gate_arch='linear')."})
    router_down_dim: Optional[int] = field(
        default=32, metadata={"help": "Dim of the token down-projection the routers read; None = no projection."})
    gate_type: str = field(
        default="switch",
        metadata={"help": "'switch' (softmax over all, top-k renormalised, Switch balance loss), 'noisy_topk' "
                          "(cosine logits + learned noise, top-k softmax, CV² importance + load loss) or 'dense' "
                          "(softmax over all experts, all selected, no aux loss)."})
    gate_arch: str = field(
        default="mlp", metadata={"help": "'mlp': query = Linear-act-Linear of the gate input; 'linear': the gate input "
                                         "itself (switch/dense only)."})
    gate_act_fn: str = field(
        default="relu", metadata={"help": "Gate MLP activation: identity, tanh, relu, prelu or 'prelu|<slope>'."})
    expert_act_fn: str = field(
        default="tanh", metadata={"help": "sigma of Eq. 3: identity, tanh, relu, prelu or 'prelu|<slope>' "
                                          "(one learnable slope per layer)."})
    activation_position: str = field(
        default="all", metadata={"help": "'all': S'MoRE (Eq. 3); 'child_v2': S'MoRE* (Eq. 10, sigma on the children's "
                                         "states); 'child': code-only variant, alpha scales only the expert term."})
    shared_expert_pool: bool = field(
        default=False, metadata={"help": "S'MoRE#: every layer uses one pool of experts (needs equal "
                                         "layer_num_experts and layer_ranks); W_l stay per layer."})
    init_method: str = field(
        default="w_final_zero",
        metadata={"help": "'w_final_zero': W_proj = 0, B and W random; 'eq_1_layer': W_proj = 0 and B, W copy each "
                          "expert into its own slot (equals a 1-layer MoE with identity sigma, Prop. 3.2); 'normal': "
                          "all random; 'b_zero': B = 0; 'bw_zero': B = W = 0."})

    def validate(self) -> None:
        super().validate()
        m = self.method_name
        depth = len(self.layer_num_experts) if isinstance(self.layer_num_experts, list) else 0
        for name in ("layer_num_experts", "layer_top_k", "layer_ranks", "gate_dims"):
            values = getattr(self, name)
            if not isinstance(values, list) or not values:
                raise MoeConfigError(name, values, "must be a non-empty list of integers, one per S'MoRE layer",
                                     method=m)
            for value in values:
                check_int(name, value, minimum=1, method=m)
            allowed = (1, depth) if name == "gate_dims" else (depth,)
            if len(values) not in allowed:
                raise MoeConfigError(name, values, f"has {len(values)} entries but `layer_num_experts` has {depth}",
                                     "give one value per S'MoRE layer (index 0 = bottom)", method=m)
        if self.layer_lora_alpha is not None:
            if not isinstance(self.layer_lora_alpha, list) or len(self.layer_lora_alpha) not in (1, depth):
                raise MoeConfigError("layer_lora_alpha", self.layer_lora_alpha, f"must be a list of 1 or {depth} "
                                     f"numbers to match `layer_num_experts` ({depth} layers)", method=m)
            for value in self.layer_lora_alpha:
                check_float("layer_lora_alpha", value, minimum=0.0, min_exclusive=True, method=m)
        for level, (fan_out, experts) in enumerate(zip(self.layer_top_k, self.layer_num_experts)):
            if fan_out > experts:
                raise MoeConfigError("layer_top_k", self.layer_top_k, f"has fan-out {fan_out} at layer {level}, more "
                                     f"than `layer_num_experts` ({experts} there)", "lower the fan-out", method=m)
        if self.router_down_dim is not None:
            check_int("router_down_dim", self.router_down_dim, minimum=1, method=m)
        check_choice("gate_type", self.gate_type, GATE_TYPES, method=m)
        check_choice("gate_arch", self.gate_arch, GATE_ARCHS, method=m)
        check_choice("activation_position", self.activation_position, ACTIVATION_POSITIONS, method=m)
        check_choice("init_method", self.init_method, INIT_METHODS, method=m)
        parse_activation("gate_act_fn", self.gate_act_fn, m)
        parse_activation("expert_act_fn", self.expert_act_fn, m)
        if self.gate_type == "noisy_topk" and self.gate_arch != "mlp":
            raise MoeConfigError("gate_arch", self.gate_arch, "must be 'mlp' with `gate_type` 'noisy_topk' (its "
                                 "cosine logits compare an MLP query with the keys)", "use gate_arch 'mlp'", method=m)
        check_bool("shared_expert_pool", self.shared_expert_pool, method=m)
        if self.shared_expert_pool:
            for name in ("layer_num_experts", "layer_ranks"):
                if len(set(getattr(self, name))) > 1:
                    raise MoeConfigError(name, getattr(self, name), "must be equal at every layer with "
                                         "`shared_expert_pool` (S'MoRE#: one pool serves all layers)",
                                         "use one value repeated, or shared_expert_pool false", method=m)

    # -- derived quantities (Eq. 4-5) -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layer_num_experts)

    @property
    def fan_out(self) -> list[int]:
        """Children per parent; the dense gate selects every expert."""
        return list(self.layer_num_experts) if self.gate_type == "dense" else list(self.layer_top_k)

    @property
    def hidden_dims(self) -> list[int]:
        """d_0 .. d_L: d_{l+1} = d_l + s_l r_l; S'MoRE# keeps d_l = s r for l >= 1."""
        dims = [0]
        for experts, rank in zip(self.layer_num_experts, self.layer_ranks):
            dims.append(experts * rank if self.shared_expert_pool else dims[-1] + experts * rank)
        return dims

    @property
    def layer_scaling(self) -> list[float]:
        if self.layer_lora_alpha is None:
            return [1.0] * self.num_layers
        alphas = self.layer_lora_alpha * self.num_layers if len(self.layer_lora_alpha) == 1 else self.layer_lora_alpha
        return [float(a) / r for a, r in zip(alphas, self.layer_ranks)]

    def gate_dim(self, level: int) -> int:
        return self.gate_dims[0] if len(self.gate_dims) == 1 else self.gate_dims[level]


def _uniform(t: torch.Tensor, fan_in: int) -> None:
    # kaiming_uniform_(a=sqrt(5)) of a (., fan_in) slice: U(+-1/sqrt(fan_in)); on stacked 3-D tensors torch would
    # multiply fan_in by the leading dims, so the bound is written out.
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    nn.init.uniform_(t, -bound, bound)


class _Plan(NamedTuple):
    """What the forward reads from the config, derived once per adapter instead of on every call (a decode step
    runs the forward of every wrapped layer for one token, where Python time is most of the cost)."""

    hidden_dims: list[int]
    fan_out: list[int]
    scaling: list[float]
    expert_act: str
    gate_act: str


class _Query(NamedTuple):
    """A gate's input, concat(token query, keys of the path's ancestors), kept in its two parts: the token's
    ``(N, 1, d)`` once per token and the ancestors' keys ``(N, P, k)`` per path (None at the root). Concatenating
    would copy the token's d features once per path, in memory and in the gate's FLOPs."""

    token: torch.Tensor
    ancestors: Optional[torch.Tensor]

    @property
    def paths(self) -> int:
        return 1 if self.ancestors is None else self.ancestors.shape[1]

    def float(self) -> "_Query":
        return _Query(self.token.float(), None if self.ancestors is None else self.ancestors.float())

    def linear(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``F.linear(concat(token, ancestors), weight, bias)`` as the sum of the two parts' products: ``(N, P, m)``."""
        if self.ancestors is None:
            return F.linear(self.token, weight, bias)
        token_dim = self.token.shape[-1]
        token_weight, key_weight = weight.split_with_sizes([token_dim, weight.shape[1] - token_dim], dim=1)
        return F.linear(self.token, token_weight, bias) + F.linear(self.ancestors, key_weight)


class SMoRELayer(MoeLoraLayer):
    # Flat per-adapter ParameterDicts (peft's save/load handles one level of names below the adapter key).
    adapter_layer_names = ("smore_experts", "smore_router")
    module_dict_names = ("smore_experts", "smore_router")

    def __init__(self, *args, **kwargs) -> None:
        self._plans: dict[str, _Plan] = {}  # adapter -> its forward plan (set before the base __init__ creates one)
        super().__init__(*args, **kwargs)

    def create_adapter(self, adapter_name: str, config: SMoREConfig) -> None:
        self._plans[adapter_name] = _Plan(config.hidden_dims, config.fan_out, config.layer_scaling,
                                          parse_activation("expert_act_fn", config.expert_act_fn)[0],
                                          parse_activation("gate_act_fn", config.gate_act_fn)[0])
        d, num_layers = config.hidden_dims, config.num_layers
        experts = nn.ParameterDict()
        for pool in range(1 if config.shared_expert_pool else num_layers):
            s, r = config.layer_num_experts[pool], config.layer_ranks[pool]
            experts[f"A_{pool}"] = nn.Parameter(torch.empty(s, r, self.in_features))  # (s_l, r_l, in)
            experts[f"A_bias_{pool}"] = nn.Parameter(torch.empty(s, r))  # (s_l, r_l)
            experts[f"B_{pool}"] = nn.Parameter(torch.empty(s, d[pool + 1], r))  # (s_l, d_{l+1}, r_l)
            experts[f"B_bias_{pool}"] = nn.Parameter(torch.empty(s, d[pool + 1]))  # (s_l, d_{l+1})
        for level in range(1, num_layers):
            experts[f"W_{level}"] = nn.Parameter(torch.empty(d[level + 1], d[level]))  # (d_{l+1}, d_l)
            experts[f"W_bias_{level}"] = nn.Parameter(torch.empty(d[level + 1]))  # (d_{l+1},)
        experts["W_proj"] = nn.Parameter(torch.empty(self.out_features, d[-1]))  # (out, d_L)
        experts["W_proj_bias"] = nn.Parameter(torch.empty(self.out_features))  # (out,)
        if parse_activation("expert_act_fn", config.expert_act_fn)[0] == "prelu":
            for level in range(num_layers):
                experts[f"act_{level}"] = nn.Parameter(torch.empty(1))  # PReLU slope of sigma at layer l

        router = nn.ParameterDict()
        query_dim = config.router_down_dim or self.in_features
        if config.router_down_dim:
            router["down"] = nn.Parameter(torch.empty(query_dim, self.in_features))  # (d_down, in)
            router["down_bias"] = nn.Parameter(torch.empty(query_dim))
        gate_prelu = parse_activation("gate_act_fn", config.gate_act_fn)[0] == "prelu"
        for level in reversed(range(num_layers)):  # the gate input grows by one key per ancestor, top-down
            s, m = config.layer_num_experts[level], config.gate_dim(level)
            if config.gate_arch == "mlp":
                router[f"mlp_in_{level}"] = nn.Parameter(torch.empty(m, query_dim))  # (m_l, in_l)
                router[f"mlp_in_bias_{level}"] = nn.Parameter(torch.empty(m))
                router[f"mlp_out_{level}"] = nn.Parameter(torch.empty(m, m))  # (m_l, m_l)
                router[f"mlp_out_bias_{level}"] = nn.Parameter(torch.empty(m))
                if gate_prelu:
                    router[f"act_{level}"] = nn.Parameter(torch.empty(1))
            key_dim = m if config.gate_arch == "mlp" else query_dim
            router[f"keys_{level}"] = nn.Parameter(torch.empty(s, key_dim))  # (s_l, m_l) one key per expert
            if config.gate_type == "noisy_topk":
                router[f"noise_{level}"] = nn.Parameter(torch.empty(s, query_dim))  # (s_l, in_l), no bias
            query_dim += key_dim
        self.smore_experts[adapter_name] = experts
        self.smore_router[adapter_name] = router

    @torch.no_grad()
    def reset_adapter(self, adapter_name: str, config: SMoREConfig) -> None:
        experts, router = self.smore_experts[adapter_name], self.smore_router[adapter_name]
        d, method = config.hidden_dims, config.init_method
        for pool in range(1 if config.shared_expert_pool else config.num_layers):
            s, r = config.layer_num_experts[pool], config.layer_ranks[pool]
            _uniform(experts[f"A_{pool}"], self.in_features)
            B = experts[f"B_{pool}"]
            if method in ("normal", "w_final_zero"):
                _uniform(B, r)
            else:
                B.zero_()
            if method == "eq_1_layer":  # Prop. 3.2: expert i writes its r_l dims into rows [i r_l, (i+1) r_l)
                expert = torch.arange(s).repeat_interleave(r)
                dim = torch.arange(r).repeat(s)
                B[expert, expert * r + dim, dim] = 1.0
            experts[f"A_bias_{pool}"].zero_()
            experts[f"B_bias_{pool}"].zero_()
        for level in range(1, config.num_layers):
            W = experts[f"W_{level}"]
            if method in ("normal", "b_zero", "w_final_zero"):
                _uniform(W, d[level])
            else:
                W.zero_()
            if method == "eq_1_layer":  # "P": the bottom d_l rows copy the children's state
                W[d[level + 1] - d[level]:].copy_(torch.eye(d[level]))
            experts[f"W_bias_{level}"].zero_()
        if method in ("w_final_zero", "eq_1_layer") and config.init_weights:
            experts["W_proj"].zero_()
        else:
            _uniform(experts["W_proj"], d[-1])
        experts["W_proj_bias"].zero_()

        query_dim = config.router_down_dim or self.in_features
        if config.router_down_dim:  # nn.Linear's default init
            _uniform(router["down"], self.in_features)
            _uniform(router["down_bias"], self.in_features)
        for level in reversed(range(config.num_layers)):
            m = config.gate_dim(level)
            if config.gate_arch == "mlp":
                for name, fan_in in ((f"mlp_in_{level}", query_dim), (f"mlp_out_{level}", m)):
                    _uniform(router[name], fan_in)
                    _uniform(router[name.replace(f"_{level}", f"_bias_{level}")], fan_in)
                router[f"keys_{level}"].uniform_(0.0, 1.0)
            else:
                router[f"keys_{level}"].normal_(0.0, 0.02)
            if config.gate_type == "noisy_topk":
                router[f"noise_{level}"].zero_()
            query_dim += router[f"keys_{level}"].shape[1]
        for params, spec in ((experts, config.expert_act_fn), (router, config.gate_act_fn)):
            for name, p in params.items():
                if name.startswith("act_"):
                    p.fill_(parse_activation("act", spec)[1])

    # -- forward ----------------------------------------------------------------------------------------------------
    def adapter_delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        config: SMoREConfig = self.moe_config[adapter_name]
        plan = self._plans[adapter_name]
        # The ParameterDicts' own name -> Parameter tables: a plain dict lookup per parameter instead of two Module
        # __getattr__ calls (about 1 us each, and S'MoRE reads ~20 parameters per forward). DeepSpeed ZeRO-3 swaps in
        # its gathering dict here, so partitioned parameters are fetched exactly as through attribute access.
        experts = self.smore_experts[adapter_name]._parameters
        router = self.smore_router[adapter_name]._parameters
        num_tokens, d = x.shape[0], plan.hidden_dims
        selected, scores = self._route(config, plan, router, x, self.token_mask(num_tokens))
        sigma = plan.expert_act
        x = self.moe_dropout[adapter_name](x)
        shared = self._all_experts(experts, x, 0) if config.shared_expert_pool else None
        state = None  # (N, F_l, d_l): aggregated states of the layer-l nodes, from their children
        scaling, fan_out = plan.scaling, plan.fan_out
        for level in range(config.num_layers):  # bottom-up (Eq. 3)
            all_out = shared if shared is not None else self._all_experts(experts, x, level)  # (N, s_l, d_{l+1})
            index = selected[level].unsqueeze(-1).expand(-1, -1, d[level + 1])
            z = gather_experts(all_out, index)  # (N, F_l, d_{l+1}) one per tree node
            if scaling[level] != 1.0:  # 1.0 unless layer_lora_alpha is set: no multiply-by-one kernel
                z = scaling[level] * z
            alpha = scores[level].to(z.dtype).unsqueeze(-1)  # (N, F_l, 1)
            slope = experts[f"act_{level}"] if sigma == "prelu" else None
            if level == 0:
                message = alpha * (activate(sigma, z, slope) if config.activation_position == "all" else z)
            elif config.activation_position == "all":
                message = alpha * activate(sigma, z + F.linear(state, experts[f"W_{level}"],
                                                               experts[f"W_bias_{level}"]), slope)
            else:
                children = F.linear(activate(sigma, state, slope), experts[f"W_{level}"], experts[f"W_bias_{level}"])
                message = alpha * (z + children) if config.activation_position == "child_v2" else alpha * z + children
            # Sum the f_l siblings of each parent: (N, F_{l+1}, f_l, d_{l+1}) -> (N, F_{l+1}, d_{l+1}).
            state = message.view(num_tokens, -1, fan_out[level], d[level + 1]).sum(2)
        return F.linear(state.squeeze(1), experts["W_proj"], experts["W_proj_bias"])  # (N, out)

    @staticmethod
    def _all_experts(experts: Mapping[str, torch.Tensor], x: torch.Tensor, pool: int) -> torch.Tensor:
        """``B^e (A^e x + a^e) + b^e`` for every expert e of a pool: ``(N, s, d)``, two batched matmuls."""
        A, B = experts[f"A_{pool}"], experts[f"B_{pool}"]
        s, r, _ = A.shape
        # Biases ride in the GEMMs (addmm / baddbmm): no separate add kernels. The flattened (s*r) bias matches the
        # flattened rows of A.
        codes = F.linear(x, A.reshape(s * r, -1), experts[f"A_bias_{pool}"].reshape(s * r)).view(-1, s, r)  # (N, s, r)
        # One batched GEMM over the s experts: (s, N, r) @ (s, r, d) + (s, 1, d) -> (s, N, d), viewed as (N, s, d).
        return torch.baddbmm(experts[f"B_bias_{pool}"].unsqueeze(1), codes.transpose(0, 1),
                             B.transpose(1, 2)).transpose(0, 1)

    def _route(self, config: SMoREConfig, plan: _Plan, router: Mapping[str, torch.Tensor], x: torch.Tensor,
               token_mask: Optional[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Top-down routing (Eq. 6). Returns per layer l the expert index ``(N, F_l)`` and score ``(N, F_l)`` fp32 of
        every tree node; node ``p * f_l + j`` is the j-th child of parent node ``p`` of layer l + 1."""
        token = F.linear(x, router["down"], router["down_bias"]) if config.router_down_dim else x
        query = _Query(token.unsqueeze(1), None)  # (N, 1, d): one virtual root per token
        selected, scores = [None] * config.num_layers, [None] * config.num_layers
        for level in reversed(range(config.num_layers)):
            index, alpha, keys = self._gate(config, plan, router, level, query, token_mask)  # (N,P,f) .. (N,P,f,k)
            selected[level], scores[level] = index.flatten(1), alpha.flatten(1)
            if level > 0:  # each child's gate sees the token and the keys of all its ancestors
                keys = keys.to(token.dtype)  # (N, P, f, k_l)
                if query.ancestors is not None:
                    num_tokens, paths, fan_out = index.shape
                    parent = query.ancestors.unsqueeze(2).expand(num_tokens, paths, fan_out, -1)
                    keys = torch.cat([parent, keys], dim=-1)
                query = _Query(query.token, keys.flatten(1, 2))  # ancestors (N, P f, k_{L-1} + .. + k_l)
        return selected, scores

    def _gate(self, config: SMoREConfig, plan: _Plan, router: Mapping[str, torch.Tensor], level: int,
              query: _Query, token_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One S'MoRE layer's gate on a query of ``P`` paths per token: indices and scores ``(N, P, f_l)``, selected
        keys."""
        num_experts, fan_out = config.layer_num_experts[level], plan.fan_out[level]
        keys = router[f"keys_{level}"]
        if config.gate_arch == "mlp":
            hidden = query.linear(router[f"mlp_in_{level}"], router[f"mlp_in_bias_{level}"])
            hidden = activate(plan.gate_act, hidden, router.get(f"act_{level}") if plan.gate_act == "prelu" else None)
            out_weight, out_bias = router[f"mlp_out_{level}"], router[f"mlp_out_bias_{level}"]
        # Router logits and probabilities in float32: bf16 loses the small differences routing depends on.
        # One mask entry per (token, path); with one path (the top layer) it is the batch's own mask, whose token
        # weights the loss window caches.
        mask = token_mask if token_mask is None or query.paths == 1 else \
            token_mask.unsqueeze(1).expand(-1, query.paths).reshape(-1)
        if config.gate_type == "noisy_topk":  # gate_arch is "mlp" (validated)
            h = F.linear(hidden, out_weight, out_bias)
            keys = F.normalize(keys.float(), dim=-1)
            clean = F.normalize(h.float(), dim=-1) @ keys.T  # (N, P, s) cosine similarity
            index, alpha = self._noisy_top_k(clean, query, router[f"noise_{level}"], fan_out, mask,
                                             config.effective_aux_loss_coef)
        else:
            if config.gate_arch == "mlp" and self.training:
                # <h, k_e> with h = W_out a + b_out is <a, W_out^T k_e> + <b_out, k_e>: in training the keys are
                # folded through the output layer (s x m, tiny), so the (N, P, m) h is neither computed nor kept for
                # backward. (At inference, with a token or a few, computing h is the cheaper order.)
                keys32 = keys.float()
                logits = F.linear(hidden.float(), keys32 @ out_weight.float(), keys32 @ out_bias.float())  # (N, P, s)
            elif config.gate_arch == "mlp":
                logits = F.linear(hidden, out_weight, out_bias).float() @ keys.float().T  # (N, P, s)
            else:  # the linear gate scores the query itself against the keys
                logits = query.float().linear(keys.float())
            # The full softmax is needed by the dense gate, a fan-out of 1 and the balance loss; not otherwise.
            probs = (torch.softmax(logits, dim=-1) if config.gate_type == "dense" or fan_out == 1 or self.training
                     else None)
            if config.gate_type == "dense":
                index = torch.arange(num_experts, device=probs.device).expand_as(probs)
                alpha = probs
            else:  # switch: top-k of the softmax, renormalised if k > 1
                # The softmax is monotonic: the logits sort like the probabilities. Ties go to the lower index.
                chosen = None
                if pairwise_rank_fuses(num_experts):
                    # Sort-free, fusable (core.routing.top_k_one_hot): one one-hot [e, r] = "e is the r-th highest"
                    # gives the indices, the kept mask and the kept scores in rank order (a sum over e, not a gather,
                    # whose backward would be a scatter). The same selection as the eager sort; the renormalised
                    # scores are the softmax over the kept logits either way.
                    one_hot = top_k_one_hot(logits.detach(), fan_out)  # (N, P, E, f) bool
                    experts = torch.arange(num_experts, device=logits.device)
                    index = (one_hot * experts.unsqueeze(-1)).sum(dim=-2)  # (N, P, f)
                    chosen = one_hot.any(dim=-1).float()  # (N, P, E)
                    source = (torch.softmax(logits.masked_fill(chosen == 0, float("-inf")), dim=-1) if fan_out > 1
                              else probs)
                    alpha = (source.unsqueeze(-1) * one_hot).sum(dim=-2)
                else:
                    index = top_k_indices(logits.detach(), fan_out)
                    # Renormalised kept probabilities = a softmax over the kept logits: one op each way instead of a
                    # sum, a division and their backward.
                    alpha = (torch.softmax(torch.gather(logits, -1, index), dim=-1) if fan_out > 1
                             else torch.gather(probs, -1, index))
                if self.training:
                    # Float 0/1 directly: the balance loss takes the routed fraction as a matrix-vector product.
                    if chosen is None:
                        chosen = torch.zeros_like(probs).scatter_(-1, index, 1.0)
                    probs_flat = probs.flatten(0, 1)
                    balance = switch_balance_loss(probs_flat, chosen.flatten(0, 1),
                                                  self.token_weights(mask, probs_flat))
                    self.record_aux("balance_loss", balance, config.effective_aux_loss_coef)
        if level == config.num_layers - 1 and self.records_routing():  # token-level statistics: the top layer
            with torch.no_grad():  # logging only: no graph, so checkpoint recomputation (window closed) matches
                top = index[:, 0]  # (N, f): P = 1 path per token at the top
                weights = alpha.new_zeros(top.shape[0], num_experts).scatter(-1, top, alpha[:, 0])
                chosen = torch.zeros_like(weights, dtype=torch.bool).scatter(-1, top, True)
                self.record_routing(weights, chosen, token_mask)
        # The selected keys feed the gates of the layer below; the bottom layer has none.
        return index, alpha, (keys[index] if level > 0 else None)

    def _noisy_top_k(self, clean: torch.Tensor, query: _Query, noise_weight: torch.Tensor, k: int,
                     mask: Optional[torch.Tensor], coef: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Noisy top-k gating (Shazeer et al. 2017, Sec. 2.1 and App. A) on cosine logits ``clean: (N, P, s)``."""
        num_experts = clean.shape[-1]
        logits = clean
        if self.training:
            noise_std = F.softplus(query.linear(noise_weight).float()) + NOISE_FLOOR  # a function of the input
            logits = clean + torch.randn_like(clean) * noise_std
        order = top_k_indices(logits, min(k + 1, num_experts))
        top = torch.gather(logits, -1, order)
        index = order[..., :k]
        alpha = torch.softmax(top[..., :k], dim=-1) if k > 1 else top[..., :k]  # k = 1: the raw top logit
        if self.training:
            gates = torch.zeros_like(logits).scatter(-1, index, alpha).flatten(0, 1)  # (N P, s)
            if k < num_experts:  # load = P(e stays in the top-k when its noise is re-drawn), App. A
                threshold_in, threshold_out = top[..., k:k + 1], top[..., k - 1:k]
                prob_in = torch.special.ndtr((clean - threshold_in) / noise_std)
                prob_out = torch.special.ndtr((clean - threshold_out) / noise_std)
                load = torch.where(logits > threshold_in, prob_in, prob_out).flatten(0, 1)
            else:
                load = torch.ones_like(gates)
            weights = gates.new_ones(gates.shape[0], 1) if mask is None else mask.to(gates.dtype).unsqueeze(-1)
            self.record_aux("importance_loss", cv_squared((gates * weights).sum(0)), coef)
            self.record_aux("load_loss", cv_squared((load * weights).sum(0)), coef)
        return index, alpha


    @torch.no_grad()
    def expert_weight_vectors(self, adapter_name: str) -> Optional[torch.Tensor]:
        """``(s_top, n)``: the top S'MoRE layer's experts ``[vec A^e, a^e, vec B^e, b^e]`` (the layer whose routing is
        recorded; with S'MoRE# the one shared pool)."""
        config: SMoREConfig = self.moe_config[adapter_name]
        experts = self.smore_experts[adapter_name]
        pool = 0 if config.shared_expert_pool else config.num_layers - 1
        parts = [experts[f"{name}_{pool}"] for name in ("A", "A_bias", "B", "B_bias")]
        if any(p.numel() == 0 for p in parts):  # DeepSpeed ZeRO-3 partition outside forward
            return None
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1).float()

class SMoREModel(MoeLoraTuner):
    prefix = "smore_"
    tuner_layer_cls = SMoRELayer


register_method(SMoREConfig, SMoREModel)
