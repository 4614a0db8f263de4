"""MoSLoRA (llamafactory_moe/methods/moslora.py) against the paper's equation, plus merge / unmerge."""

import json
import math

import pytest
import torch
import torch.nn as nn
from peft import get_peft_model

import llamafactory_moe  # noqa: F401  (registers the methods)
from llamafactory_moe.core import MoeConfigError, loss_window
from llamafactory_moe.methods.moslora import MoSLoRAConfig, MoSLoRALayer
from tests.methods.common import assert_reloads_bit_exact_in_fresh_process, count_train_ops, tiny_llama

IN, OUT = 24, 20
PARAM_NAMES = ("moslora_A", "moslora_mixer", "moslora_B")
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # the MoSLoRA commonsense targets


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.proj(x)


class FixedMask(nn.Module):
    """A deterministic stand-in for nn.Dropout, so the reference can apply the same mask."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def make_layer(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = get_peft_model(Tiny(), MoSLoRAConfig(target_modules=["proj"], **kwargs))
    return model, model.base_model.model.proj


def reference(layer: MoSLoRALayer, config: MoSLoRAConfig, x, input_mask=None):
    """y = W0 x + b + s * sum_p sum_q B[:, p] W_m[p, q] (A[q] . drop(x)) per token: every subspace pair (p, q)."""
    r, s = config.expert_rank, config.alpha / config.expert_rank
    base = layer.base_layer
    A, W, B = (layer.moslora_A["default"], layer.moslora_mixer["default"], layer.moslora_B["default"])
    outputs = []
    for n, x_n in enumerate(x.reshape(-1, IN)):
        dropped = x_n if input_mask is None else x_n * input_mask[n]
        y = base.weight @ x_n + base.bias
        for p in range(r):
            for q in range(r):
                y = y + s * W[p, q] * (A[q] @ dropped) * B[:, p]
        outputs.append(y)
    return torch.stack(outputs).reshape(*x.shape[:-1], OUT)


CASES = [
    dict(expert_rank=4, lora_alpha=8),
    dict(expert_rank=1),
    dict(expert_rank=3, lora_alpha=5, expert_dropout=0.25),
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_output_and_gradients_match_reference(kwargs):
    model, layer = make_layer(init_weights=False, **kwargs)
    config = model.peft_config["default"]
    torch.manual_seed(1)
    x = torch.randn(3, 5, IN, requires_grad=True)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 2:] = 0
    input_mask = None
    if config.expert_dropout > 0:
        input_mask = (torch.rand(15, IN) > 0.25).float() / 0.75
        layer.moe_dropout["default"] = FixedMask(input_mask)
    cotangent = torch.randn(3, 5, OUT)
    params = [x] + [getattr(layer, name)["default"] for name in PARAM_NAMES]
    layer.train()
    with loss_window.collect(token_mask=mask) as window:
        out = layer(x)
    assert window.terms == {}  # no auxiliary loss
    ref_out = reference(layer, config, x, input_mask)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad((out * cotangent).sum(), params)
    ref_grads = torch.autograd.grad((ref_out * cotangent).sum(), params)
    for name, g, rg in zip(("x",) + PARAM_NAMES, grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5, msg=lambda m: f"grad of {name}: {m}")


def test_init_distributions_and_identity():
    r = 8
    _, layer = make_layer(expert_rank=r)
    A, W, B = (layer.moslora_A["default"], layer.moslora_mixer["default"], layer.moslora_B["default"])
    assert A.abs().max() <= 1 / math.sqrt(IN) and W.abs().max() <= 1 / math.sqrt(r)
    assert W.abs().max() > 0.5 / math.sqrt(r)  # Kaiming-uniform, not identity or zero
    assert torch.count_nonzero(B) == 0
    x = torch.randn(6, IN)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)


def test_delta_weight_is_scaled_B_mixer_A():
    _, layer = make_layer(expert_rank=3, lora_alpha=9, init_weights=False)
    A, W, B = (layer.moslora_A["default"], layer.moslora_mixer["default"], layer.moslora_B["default"])
    torch.testing.assert_close(layer.get_delta_weight("default"), 3.0 * B @ W @ A, atol=1e-6, rtol=1e-6)


def test_merge_unmerge_and_merge_and_unload():
    assert MoSLoRAConfig.supports_merge
    model = tiny_llama()
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, MoSLoRAConfig(target_modules=TARGETS, expert_rank=4, init_weights=False))
    peft_model.eval()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        unmerged = peft_model(ids).logits
        peft_model.merge_adapter()
        assert all(m.merged for m in peft_model.modules() if isinstance(m, MoSLoRALayer))
        torch.testing.assert_close(peft_model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)
        peft_model.unmerge_adapter()
        for name, param in peft_model.base_model.model.named_parameters():
            key = name.replace(".base_layer", "")
            if key in base_weights:
                torch.testing.assert_close(param, base_weights[key], atol=1e-6, rtol=0)
        torch.testing.assert_close(peft_model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)
        merged_model = peft_model.merge_and_unload()
        assert not any(isinstance(m, MoSLoRALayer) for m in merged_model.modules())
        torch.testing.assert_close(merged_model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, field", [
    (dict(expert_rank=0), "expert_rank"),
    (dict(expert_rank=2.0), "expert_rank"),
    (dict(lora_alpha=-1), "lora_alpha"),
    (dict(expert_dropout=-0.1), "expert_dropout"),
    (dict(num_experts=4), "num_experts"),
    (dict(top_k=1), "top_k"),
    (dict(aux_loss_coef=0.01), "aux_loss_coef"),
])
def test_invalid_config(kwargs, field):
    with pytest.raises(MoeConfigError, match=f"`{field}`") as info:
        MoSLoRAConfig(**kwargs)
    assert info.value.field == field and "moslora" in str(info.value)


def test_bf16_forward_backward_and_merge():
    model = tiny_llama(torch.bfloat16)
    peft_model = get_peft_model(model, MoSLoRAConfig(target_modules=TARGETS, expert_rank=4, init_weights=False))
    ids = torch.randint(0, 128, (2, 6))
    out = peft_model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for n, p in peft_model.named_parameters() if "moslora_mixer" in n)
    with torch.no_grad():
        peft_model.merge_adapter()
        assert torch.isfinite(peft_model(ids).logits).all()


def test_disable_adapter_equals_base_model():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        base = model(ids).logits
        peft_model = get_peft_model(model, MoSLoRAConfig(target_modules=["q_proj", "v_proj"], expert_rank=2,
                                                         init_weights=False))
        assert not torch.equal(peft_model(ids).logits, base)
        with peft_model.disable_adapter():
            assert torch.equal(peft_model(ids).logits, base)


def test_save_and_load_in_fresh_process_is_bit_exact(tmp_path):
    peft_model = get_peft_model(tiny_llama(), MoSLoRAConfig(target_modules=TARGETS, expert_rank=4, init_weights=False))
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        logits = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "MOSLORA" and saved_config["num_experts"] == 1
    assert_reloads_bit_exact_in_fresh_process(tmp_path, ids, logits)


def count_ops(rank: int) -> int:
    return count_train_ops(MoSLoRAConfig(target_modules=["0"], expert_rank=rank, init_weights=False,
                                         expert_dropout=0.1))


def test_op_count_does_not_depend_on_rank():
    # MoSLoRA has no experts; its "mixture" is over the r subspaces, so the rank plays the expert count's role.
    assert count_ops(4) == count_ops(16)
