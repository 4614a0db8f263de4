"""Models, adapters and the closures the benchmark times: a training step, a single layer, ``generate()``."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..core import loss_window
from ..core.step_hooks import apply_optimizer_step_updates
from .cases import BenchCase

LLAMA_LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0) -> nn.Module:
    """A random ``LlamaForCausalLM`` (hidden 64, 2 layers), built in-process for CI."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)
    return LlamaForCausalLM(config)


def smollm2(model_dir: Optional[str] = None) -> tuple[nn.Module, str]:
    """SmolLM2-135M-Instruct in fp32, from ``model_dir`` or ``llamafactory_moe.models.prepare_smollm2()``."""
    from transformers import AutoModelForCausalLM

    if model_dir is None:
        try:
            from ..models import prepare_smollm2
        except ImportError as exc:
            raise RuntimeError(
                "SmolLM2 is not available: `llamafactory_moe.models.prepare_smollm2` cannot be imported "
                f"({exc}). Pass --model-dir <hf folder>, or use --tiny for the in-process random model."
            ) from exc
        model_dir = str(prepare_smollm2())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, model_dir


def shared_copy(model: nn.Module, share: bool = True) -> nn.Module:
    """A copy with its own module objects (so PEFT can wrap it) that shares the frozen base tensors when ``share``.

    All variants then live side by side in memory for interleaved timing at the cost of one base model. Methods
    flagged ``modifies_base_weights`` get a full copy, so they can never disturb another variant's base weights.
    """
    memo = {}
    if share:
        for tensor in list(model.parameters()) + list(model.buffers()):
            memo[id(tensor)] = tensor
    return copy.deepcopy(model, memo)


def build_config(case: Optional[BenchCase], targets: list[str], lora_rank: Optional[int] = None,
                 num_experts: Optional[int] = None):
    """The PEFT config of a method case, or of stock LoRA at ``lora_rank`` when ``case`` is None."""
    if case is None:
        from peft import LoraConfig

        return LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=list(targets))
    from ..core.peft_types import METHODS, register_all_methods

    register_all_methods()
    return METHODS[case.method].config_cls(target_modules=list(targets), **case.config_kwargs(num_experts))


def modifies_base(case: Optional[BenchCase]) -> bool:
    if case is None:
        return False
    from ..core.peft_types import METHODS

    return bool(getattr(METHODS[case.method].config_cls, "modifies_base_weights", False))


def wrap(base: nn.Module, config, seed: int) -> nn.Module:
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(base, config)


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_params_per_rank(model: nn.Module, targets: list[str]) -> int:
    """Trainable parameters one unit of LoRA rank adds on ``targets``: the sum of ``in + out`` over wrapped linears."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
            total += module.in_features + module.out_features
    return total


# -- closures -------------------------------------------------------------------------------------------------------
@dataclass
class TrainVariant:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], None]


def train_variant(model: nn.Module, batch: dict[str, torch.Tensor], lr: float = 1e-4) -> TrainVariant:
    """forward + aux loss (the trainer's window) + backward + AdamW step + once-per-step adapter updates."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    # AdamW creates its state lazily in the first step; creating it now (exactly what that first step would create)
    # makes every step, including the first, a steady-state step, so one untimed step suffices as warm-up.
    for p in params:
        optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with loss_window.collect(token_mask=batch["attention_mask"]) as window:
            out = model(**batch)
            loss = out.loss
            aux = window.weighted_total()
            if aux is not None:
                loss = loss + aux
        loss.backward()
        optimizer.step()
        apply_optimizer_step_updates(model)

    return TrainVariant(model, optimizer, step)


class LinearContainer(nn.Module):
    """The smallest host PEFT can wrap: one ``nn.Linear`` named ``proj``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class LinearStack(nn.Module):
    """``depth`` linears named ``layers.<i>.proj``, applied in sequence (for per-layer op counts)."""

    def __init__(self, dim: int, depth: int):
        super().__init__()
        self.layers = nn.ModuleList(LinearContainer(nn.Linear(dim, dim)) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def layer_fwd_bwd(model: nn.Module, x: torch.Tensor, grad_out: torch.Tensor,
                  token_mask: Optional[torch.Tensor] = None) -> Callable[[], None]:
    """One training forward + backward of a single wrapped layer (aux terms included, as in training)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        with loss_window.collect(token_mask=token_mask) as window:
            out = model(x)
            aux = window.weighted_total()
        if aux is None:
            out.backward(grad_out)
        else:
            torch.autograd.backward([out, aux], [grad_out, torch.ones_like(aux)])

    return run


def generate_fn(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    """Greedy ``generate()`` with the KV cache, always exactly ``new_tokens`` tokens (EOS ignored)."""
    model.eval()
    attention_mask = torch.ones_like(input_ids)

    def run() -> None:
        with torch.no_grad():
            model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0,
                           eos_token_id=None)

    return run
