"""Quantized base models (QLoRA-style): our layers wrap quantized linear modules without touching their weights;
methods that correct the frozen base weights (config flag `modifies_base_weights`) refuse.

bitsandbytes' Linear8bitLt / Linear4bit need a GPU, so `StandInQuantLinear` below takes their place. It is a STAND-IN,
not bitsandbytes: an `nn.Linear` subclass (as both bnb classes are) whose weight holds int8 codes plus a per-row scale
and is dequantised in forward. What is untested without a GPU: bnb's own kernels, Params4bit packing, and
`prepare_model_for_kbit_training` on a real quantized checkpoint.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from llamafactory_moe.core.errors import MoeConfigError
from llamafactory_moe.core.layer import MoeLoraLayer
from llamafactory_moe.core.peft_types import METHODS
from tests.test_matrix import CASES, TARGETS, tiny_llama


class StandInQuantLinear(nn.Linear):
    """STAND-IN for a bitsandbytes quantized linear layer (see module docstring): int8 weight codes, fp32 row scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            scale = linear.weight.abs().amax(dim=1).clamp_min(1e-8) / 127.0
            codes = torch.round(linear.weight / scale[:, None]).to(torch.int8)
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.register_buffer("scale", scale)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype) * self.scale[:, None].to(x.dtype), self.bias)


def dequantised_tiny_llama():
    """The float model a quantized one stands for: every quantized linear replaced by an nn.Linear holding its
    dequantised weight (codes x scale). Our layers on it are the reference for our layers on the quantized model."""
    model = quantized_tiny_llama()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, StandInQuantLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.float() * child.scale[:, None])
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(module, child_name, linear)
    model.requires_grad_(False)
    return model


def quantized_tiny_llama():
    model = tiny_llama(0)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in TARGETS:
                setattr(module, child_name, StandInQuantLinear(child))
    model.quantization_method = "bitsandbytes"  # what transformers sets on a bnb-loaded model
    model.requires_grad_(False)
    return model


def _setup(method: str, kwargs: dict, model):
    from llamafactory_moe.integrations.llamafactory import _setup_moe_adapter

    config = METHODS[method].config_cls(**kwargs)
    finetuning_args = SimpleNamespace(moe_method=method, moe_peft_config=config, lora_target=list(TARGETS),
                                      pure_bf16=False, use_badam=False, freeze_vision_tower=True,
                                      additional_target=None)
    model_args = SimpleNamespace(quantization_bit=8, adapter_name_or_path=None, cache_dir=None, hf_hub_token=None,
                                 export_dir=None, resize_vocab=False)
    return _setup_moe_adapter(model, model_args, finetuning_args, True, [])


@pytest.mark.parametrize("case_id, method, kwargs, lf_keys", CASES)
def test_quantized_linear_is_wrapped_untouched_or_refused(case_id, method, kwargs, lf_keys):
    model = quantized_tiny_llama()
    codes_before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, StandInQuantLinear)}
    if METHODS[method].config_cls.modifies_base_weights:
        with pytest.raises(MoeConfigError) as info:
            _setup(method, kwargs, model)
        assert "`quantization_bit`" in str(info.value) and f"`{method}`" in str(info.value)
        return
    peft_model = _setup(method, {**kwargs, "init_weights": False}, model)
    layers = [m for m in peft_model.modules() if isinstance(m, MoeLoraLayer)]
    assert layers and all(isinstance(layer.get_base_layer(), StandInQuantLinear) for layer in layers)
    for layer in layers:  # sized from in/out features; adapters float32 whatever the base weight's storage dtype
        assert all(p.dtype == torch.float32 for p in layer.parameters() if p.requires_grad)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    peft_model.train()
    torch.manual_seed(1)  # the same draws in every run below (dropout, S'MoRE's noisy gate)
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    assert trained and all(f"{method}_" in n for n in trained), list(trained)
    # Same adapter weights on the dequantised float model: same loss and same adapter gradients (the layer uses the
    # base layer's own forward, i.e. the dequantised weight, never the raw int8 codes).
    reference = _setup(method, {**kwargs, "init_weights": False}, dequantised_tiny_llama())
    set_peft_model_state_dict(reference, get_peft_model_state_dict(peft_model))
    reference.train()
    torch.manual_seed(1)
    reference_loss = reference(input_ids=ids, labels=ids).loss
    reference_loss.backward()
    assert abs(loss.item() - reference_loss.item()) <= 1e-5, (loss.item(), reference_loss.item())
    reference_grads = {n.replace(".base_layer", ""): p.grad for n, p in reference.named_parameters()
                       if p.grad is not None}
    for name, grad in trained.items():
        torch.testing.assert_close(grad, reference_grads[name.replace(".base_layer", "")], atol=1e-5, rtol=0)
    # Negative control: the raw int8 codes as if they were float weights give another loss.
    wrong = _setup(method, {**kwargs, "init_weights": False}, dequantised_tiny_llama())
    with torch.no_grad():
        for (n, m), (_, q) in zip(wrong.named_modules(), peft_model.named_modules()):
            if isinstance(q, StandInQuantLinear):
                m.weight.copy_(q.weight.float())
    set_peft_model_state_dict(wrong, get_peft_model_state_dict(peft_model))
    wrong.train()
    torch.manual_seed(1)
    assert abs(wrong(input_ids=ids, labels=ids).loss.item() - loss.item()) > 1e-3
    codes_after = {n.removeprefix("base_model.model.").replace(".base_layer", ""): m.weight
                   for n, m in peft_model.named_modules() if isinstance(m, StandInQuantLinear)}
    for name, codes in codes_before.items():
        assert codes_after[name].dtype == torch.int8 and torch.equal(codes_after[name], codes), name
        assert not codes_after[name].requires_grad
