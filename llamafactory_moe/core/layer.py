"""``MoeLoraLayer``: the PEFT tuner layer every method subclasses (peft's ``BaseTunerLayer`` contract).

What lives here, once: per-adapter containers, the input dropout, device/dtype moves, the disabled / merged / active
adapters forward skeleton, merge and unmerge (refused with a clear error for routed methods), the optimizer-step hook
and the routing-statistics hook. A method subclass declares its parameter containers and implements:

* ``create_adapter(adapter_name, config)`` — create the parameters (one shape comment each),
* ``reset_adapter(adapter_name, config)`` — initialise them (under ``torch.no_grad()``),
* ``adapter_delta(adapter_name, x)`` — the paper's update for flattened ``x: (N, in_features)``, returning
  ``(N, out_features)``; it records its auxiliary terms with ``self.record_aux`` and its routing with
  ``self.record_routing`` (or lets ``self.switch_route`` do both). A method whose update ends in a GEMM
  sets ``fuses_residual = True`` and takes ``residual`` (the base output, ``(N, out_features)``, or None): it returns
  ``residual + update`` with the add inside that GEMM (``core.experts.up_projection``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
import torch.nn as nn
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge

from . import loss_window
from .config import MoeLoraConfig
from .routing import routing_summary, softmax_top_k, switch_balance_loss


class MoeLoraLayer(nn.Module, BaseTunerLayer):
    # Trainable per-adapter containers (nn.ParameterDict unless named in `module_dict_names`).
    adapter_layer_names: ClassVar[tuple[str, ...]] = ()
    # Containers that hold nn.Modules per adapter (e.g. a gate MLP) instead of single Parameters.
    module_dict_names: ClassVar[tuple[str, ...]] = ()
    # Persistent, non-trainable per-adapter tensors (saved in the checkpoint, never made trainable by set_adapter).
    buffer_names: ClassVar[tuple[str, ...]] = ()
    # True: `adapter_delta(name, x, residual)` adds the base output inside its last GEMM (see the module docstring).
    fuses_residual: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MoeLoraConfig, **kwargs: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.moe_config: dict[str, MoeLoraConfig] = {}
        self.moe_dropout = nn.ModuleDict({})
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ModuleDict({}) if name in self.module_dict_names else nn.ParameterDict({}))
        for name in self.buffer_names:
            setattr(self, name, BufferDict({}, persistent=True))
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        self.moe_layer_name = kwargs.get("layer_name", "")

        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None:
            raise TypeError(f"cannot wrap {type(self.get_base_layer()).__name__}: it has no in/out features; "
                            "only nn.Linear-like modules can host LoRA experts")
        # From the module, not from weight.shape: under DeepSpeed ZeRO-3 the weight is partitioned (shape [0]).
        self.in_features, self.out_features = in_features, out_features
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)
        # A new nn.Module starts in training mode; follow the wrapped layer, so wrapping an eval-mode model does not
        # switch on expert dropout or a noisy gate's noise (peft's LoRA layers get this from the model's mode later).
        self.train(base_layer.training)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # peft reads `other_param_names` to list adapters and move per-adapter state; buffers are listed here and not
        # in `adapter_layer_names`, which `set_adapter` would make trainable.
        cls.other_param_names = ("moe_config", "moe_dropout") + tuple(cls.buffer_names)

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: MoeLoraConfig, inference_mode: bool = False) -> None:
        self.moe_config[adapter_name] = config
        self.moe_dropout[adapter_name] = (nn.Dropout(config.expert_dropout) if config.expert_dropout > 0
                                          else nn.Identity())
        self.create_adapter(adapter_name, config)
        self.reset_adapter(adapter_name, config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode or config.inference_mode)

    def create_adapter(self, adapter_name: str, config: MoeLoraConfig) -> None:
        raise NotImplementedError

    def reset_adapter(self, adapter_name: str, config: MoeLoraConfig) -> None:
        raise NotImplementedError

    def adapter_delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- forward skeleton (peft's: disabled -> base; merged -> base; else base + active adapters) ---------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)

        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        first_container = getattr(self, self.adapter_layer_names[0])
        # The one place that decides whether this forward records aux terms, routing statistics and step statistics:
        # not when it is a no-grad pass inside a training step (KTO's KL batch); see `loss_window.pause_unless_counted`.
        paused = loss_window.pause_unless_counted()
        try:
            for adapter_name in self.active_adapters:
                if adapter_name not in first_container:
                    continue
                adapter_dtype = self.adapter_dtype(adapter_name)
                x_flat = self._cast_input_dtype(x, adapter_dtype).reshape(-1, self.in_features)
                if self.fuses_residual and result_dtype == adapter_dtype:
                    residual = result.reshape(-1, self.out_features)
                    result = self.adapter_delta(adapter_name, x_flat, residual=residual).view(result.shape)
                else:  # e.g. fp32 adapters on a bf16 base: the update is cast to the base dtype, as in peft's LoRA
                    delta = self.adapter_delta(adapter_name, x_flat)
                    result = result + delta.reshape(result.shape).to(result_dtype)
        finally:
            loss_window.resume(paused)
        return result

    def adapter_dtype(self, adapter_name: str) -> torch.dtype:
        container = getattr(self, self.adapter_layer_names[0])[adapter_name]
        if isinstance(container, nn.Module):
            return next(container.parameters()).dtype
        return container.dtype

    # -- helpers for method files: the only way a method reaches the loss window (core/loss_window.py) -------------
    def records_training_statistics(self) -> bool:
        """Whether this forward's aux terms and per-step statistics (SMoRA's counts) are kept: in training mode, inside
        the trainer's loss window, in a forward that is part of the loss (``loss_window.recording()``: not a no-grad
        pass such as KTO's KL batch, which ``forward`` pauses the window for; not a checkpoint recomputation). Decides
        only what is recorded, never what is computed, so a non-reentrant recomputation repeats the original forward's
        ops exactly."""
        return self.training and loss_window.recording()

    def record_aux(self, term: str, value: torch.Tensor, coef: float) -> None:
        """Record an auxiliary loss term; only while ``records_training_statistics()``."""
        if self.records_training_statistics():
            loss_window.record_term(term, value, coef)

    def wants_routing_statistics(self) -> bool:
        """Whether router probabilities and selection masks are needed: for balance losses (training) or for routing
        logs. Generation needs neither and skips their kernels. (Recomputation under gradient checkpointing runs in
        training mode, so it repeats the original forward's differentiable ops exactly.)"""
        return self.training or loss_window.wants_routing()

    def records_routing(self) -> bool:
        """Whether this forward's routing summaries are wanted (logging steps, ``analyze``): guard summary-only work."""
        return loss_window.wants_routing()

    def record_routing(self, routing_weights: torch.Tensor, selected: Optional[torch.Tensor],
                       token_mask: Optional[torch.Tensor]) -> None:
        """Hand this layer's per-expert load statistics (``core.routing.routing_summary``) to the loss window when they
        are wanted. Cheap enough to leave on: it computes only on logging steps. ``selected`` None: dense routing."""
        if loss_window.wants_routing():
            loss_window.record_routing_summary(self.moe_layer_name or self.__class__.__name__,
                                               routing_summary(routing_weights, selected, token_mask))

    def token_mask(self, num_tokens: int) -> Optional[torch.Tensor]:
        """Bool ``(N,)`` mask of non-padding tokens for the current training batch, or None."""
        return loss_window.batch_token_mask(num_tokens) if self.training else None

    def token_weights(self, token_mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """``(N,)`` weights (N = ``like.shape[0]``, its dtype and device) whose dot product with per-token values is
        their mean over real tokens: ``1/n_real`` for a real token, 0 for padding (``token_mask`` None: ``1/N``). The
        batch mask's weights are computed once per batch and shared by every layer."""
        return loss_window.token_weights(token_mask, like.shape[0], like.dtype, like.device)

    def switch_route(self, router_logits: torch.Tensor, top_k: Optional[int], aux_loss_coef: float) -> torch.Tensor:
        """Switch / Mixtral routing of ``(N, E)`` router logits: softmax, keep the top-k, renormalise (``top_k`` None or
        ``E``: soft routing). In training it records the Switch balance loss weighted by ``aux_loss_coef`` (skipped with
        soft routing, where it is the constant E); it records the routing summaries when they are wanted. Returns the
        dense ``(N, E)`` float32 routing weights. (The balance loss is computed whenever the layer is in training mode,
        not only while a window records: checkpoint recomputation, which runs without a window, must repeat the
        original forward's ops.)"""
        num_tokens, num_experts = router_logits.shape
        routing_weights, router_probs, selected = softmax_top_k(
            router_logits, top_k, statistics=self.wants_routing_statistics())
        token_mask = self.token_mask(num_tokens)
        if self.training and top_k is not None and top_k < num_experts:
            balance = switch_balance_loss(router_probs, selected, self.token_weights(token_mask, router_probs))
            self.record_aux("balance_loss", balance, aux_loss_coef)
        self.record_routing(routing_weights, selected, token_mask)
        return routing_weights

    # -- once-per-optimizer-step updates (SMoRA's loss-free balancing) -------------------------------------------------
    def step_statistics(self) -> list[torch.Tensor]:
        """Statistics accumulated since the last optimizer step (e.g. per-expert token counts). They are summed
        across data-parallel ranks in one collective before ``apply_step_statistics``. Default: none."""
        return []

    def apply_step_statistics(self, reduced: list[torch.Tensor]) -> None:
        """Use the rank-summed statistics once per optimizer step, then reset them."""

    # -- expert weights for analysis (expert similarity) -------------------------------------------------------------
    # (A, B) container names of the paired expert layout A: (E*r, in), B: (out, E*r) (core.experts.paired_experts);
    # None: see `up_expert_name`, or the method overrides `expert_weight_vectors` or has no experts.
    paired_expert_names: ClassVar[Optional[tuple[str, str]]] = None
    # The B container (out, E*r) whose column blocks are the experts, when only the up-projections are per expert
    # (one shared or separately routed A: HydraLoRA's heads, D2MoRA's up-experts).
    up_expert_name: ClassVar[Optional[str]] = None

    @torch.no_grad()
    def expert_weight_vectors(self, adapter_name: str) -> Optional[torch.Tensor]:
        """``(E, n)``: expert ``e``'s weights flattened into one row, the experts being the ones routing statistics
        count (``record_routing``). Default: ``[vec A_e, vec B_e]`` of the paired layout; None when the method has no
        experts to compare (MoSLoRA). Called on logging steps and by ``analyze``, never in ``forward``."""
        if self.paired_expert_names is None:
            return None if self.up_expert_name is None else self._up_expert_vectors(adapter_name)
        a_name, b_name = self.paired_expert_names
        A, B = getattr(self, a_name)[adapter_name], getattr(self, b_name)[adapter_name]
        num_experts = self.moe_config[adapter_name].num_experts
        if A.numel() == 0 or B.numel() == 0:  # DeepSpeed ZeRO-3 partition outside forward
            return None
        rank = A.shape[0] // num_experts
        A_e = A.reshape(num_experts, rank * A.shape[1])  # rows e*r .. (e+1)*r of A
        B_e = B.reshape(B.shape[0], num_experts, rank).transpose(0, 1).reshape(num_experts, -1)  # columns of B
        return torch.cat([A_e, B_e], dim=1).float()

    def _up_expert_vectors(self, adapter_name: str) -> Optional[torch.Tensor]:
        """``(E, out*r)``: expert ``e``'s column block ``B[:, e*r:(e+1)*r]`` flattened into one row."""
        B = getattr(self, self.up_expert_name)[adapter_name]
        if B.numel() == 0:  # DeepSpeed ZeRO-3 partition outside forward
            return None
        num_experts = self.moe_config[adapter_name].num_experts
        return B.reshape(B.shape[0], num_experts, -1).transpose(0, 1).reshape(num_experts, -1).float()

    # -- merge -------------------------------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        config = self.moe_config[adapter_name]
        raise NotImplementedError(
            f"`{config.method_name}` routes each token through input-dependent experts, so its update cannot be "
            "folded into the base weight. Keep the adapter unmerged: load it with `adapter_name_or_path` (chat, api, "
            "webchat, OpenCompass `peft_path`)."
        )

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base_layer = self.get_base_layer()
        for adapter_name in adapter_names:
            delta = self.get_delta_weight(adapter_name).to(base_layer.weight.dtype)
            with torch.no_grad():
                merged = base_layer.weight.data + delta
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"merging adapter `{adapter_name}` produced NaN/inf weights")
                base_layer.weight.data = merged
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        base_layer = self.get_base_layer()
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            with torch.no_grad():
                base_layer.weight.data -= self.get_delta_weight(adapter_name).to(base_layer.weight.dtype)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(in={self.in_features}, out={self.out_features}, base={self.base_layer!r})"
