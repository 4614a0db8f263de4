"""``MoeLoraTuner``: the PEFT ``BaseTuner`` every method's model class subclasses with two lines::

    class GoatModel(MoeLoraTuner):
        prefix = "goat_"
        tuner_layer_cls = GoatLayer

It wraps each targeted ``nn.Linear`` in the method's layer, names the layer (for routing statistics), refuses merging
for routed methods with a clear message, and offers ``aux_loss_terms`` for direct PEFT users who train without
LLaMA-Factory.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from . import loss_window
from .compiling import configure_dynamo
from .config import MoeLoraConfig
from .errors import MoeConfigError
from .gloo_exit import register_exit_guard
from .layer import MoeLoraLayer
from .step_hooks import apply_optimizer_step_updates


class MoeLoraTuner(BaseTuner):
    prefix: str = ""
    tuner_layer_cls: type[MoeLoraLayer] = MoeLoraLayer
    # Same defaults as LoRA (q_proj, v_proj for Llama) when `target_modules` is not given.
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # A distributed run (DeepSpeed, torchrun, a user's own script): gloo's worker threads outlive
            # destroy_process_group() and can abort the process at exit; the guard waits for them (gloo_exit.py).
            register_exit_guard()
        configure_dynamo()  # compiled checkpointing of our layers, as eager: see core/compiling.py
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _create_and_replace(self, config: MoeLoraConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs) -> None:
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise MoeConfigError(
                "target_modules", current_key,
                f"matched a {type(base).__name__}; `{config.method_name}` experts wrap nn.Linear layers only",
                "narrow `target_modules`")
        new_module = self.tuner_layer_cls(target, adapter_name, config, layer_name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter is not trained
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self):
        super()._check_merge_allowed()
        for name, config in self.peft_config.items():
            if not getattr(config, "supports_merge", False):
                raise NotImplementedError(
                    f"Adapter `{name}` is `{config.method_name}`: it routes each token through input-dependent "
                    "experts, so it cannot be merged into the base weights. Keep it unmerged (load it with "
                    "`adapter_name_or_path` / `PeftModel.from_pretrained`)."
                )

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        # Buffers (e.g. SMoRA's balancing bias) are never parameters, so nothing else to freeze.

    def aux_loss_window(self, token_mask: Optional[torch.Tensor] = None):
        """For plain-PEFT training loops: ``with model.aux_loss_window(mask) as w: loss = ...``, then add
        ``w.weighted_total()`` (None for a method without auxiliary loss) to the loss (README, "Your own training
        loop")."""
        return loss_window.collect(token_mask=token_mask)

    def apply_optimizer_step_updates(self) -> int:
        """For plain-PEFT training loops, after each ``optimizer.step()`` on every rank: the once-per-step updates of
        non-trainable adapter state (SMoRA's loss-free balancing bias), all-reduced across data-parallel ranks. Returns
        the number of layers updated (0 for methods without such state)."""
        return apply_optimizer_step_updates(self.model)

    def moe_layers(self) -> list[MoeLoraLayer]:
        return [m for m in self.model.modules() if isinstance(m, MoeLoraLayer)]
