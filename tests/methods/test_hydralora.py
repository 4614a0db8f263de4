"""HydraLoRA (llamafactory_moe/methods/hydralora.py) against the paper's equations written as per-token loops."""

import json

import pytest
import torch
import torch.nn as nn
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

import llamafactory_moe  # noqa: F401  (registers the methods)
from llamafactory_moe.core import MoeConfigError, loss_window
from llamafactory_moe.methods.hydralora import HydraLoRAConfig, HydraLoRALayer
from tests.methods.common import assert_reloads_bit_exact_in_fresh_process, count_train_ops, tiny_llama

IN, OUT = 24, 20
PARAM_NAMES = ("hydralora_A", "hydralora_B", "hydralora_router")


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
    model = get_peft_model(Tiny(), HydraLoRAConfig(target_modules=["proj"], **kwargs))
    return model, model.base_model.model.proj


def batch_with_padding(seed=1):
    torch.manual_seed(seed)
    x = torch.randn(3, 5, IN)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return x, mask


def reference(layer: HydraLoRALayer, config: HydraLoRAConfig, x, mask, input_mask=None):
    """y = W0 x + s * sum_j softmax(R x)_j B_j A drop(x) per token; cv^2 of mean head probability over real tokens."""
    N, r, s = config.num_experts, config.expert_rank, config.alpha / config.expert_rank
    base = layer.base_layer
    A, B, R = (layer.hydralora_A["default"], layer.hydralora_B["default"], layer.hydralora_router["default"])
    outputs, probs = [], []
    for n, x_n in enumerate(x.reshape(-1, IN)):
        dropped = x_n if input_mask is None else x_n * input_mask[n]
        g = torch.softmax(R @ x_n, dim=-1)
        y = base.weight @ x_n + base.bias
        for j in range(N):
            y = y + s * g[j] * (B[:, j * r:(j + 1) * r] @ (A @ dropped))
        outputs.append(y)
        probs.append(g)
    real = [p for p, keep in zip(probs, mask.reshape(-1).tolist()) if keep]
    importance = sum(real) / len(real)
    mean = importance.sum() / N
    variance = ((importance - mean) ** 2).sum() / (N - 1) if N > 1 else torch.zeros(())
    cv2 = variance / (mean ** 2 + 1e-10)
    return torch.stack(outputs).reshape(*x.shape[:-1], OUT), cv2


CASES = [
    dict(num_experts=4, expert_rank=2, lora_alpha=8),
    dict(num_experts=1, expert_rank=3),
    dict(num_experts=6, expert_rank=1, head_balance_loss=True),
    dict(num_experts=3, expert_rank=2, head_balance_loss=True, aux_loss_coef=0.3, expert_dropout=0.2),
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_output_gradients_and_aux_match_reference(kwargs):
    model, layer = make_layer(init_weights=False, **kwargs)
    config = model.peft_config["default"]
    x, mask = batch_with_padding()
    x.requires_grad_(True)
    input_mask = None
    if config.expert_dropout > 0:
        torch.manual_seed(2)
        input_mask = (torch.rand(15, IN) > 0.2).float() / 0.8
        layer.moe_dropout["default"] = FixedMask(input_mask)
    cotangent = torch.randn(3, 5, OUT)
    params = [x] + [getattr(layer, name)["default"] for name in PARAM_NAMES]

    layer.train()
    with loss_window.collect(token_mask=mask) as window:
        out = layer(x)
    ref_out, ref_cv2 = reference(layer, config, x, mask, input_mask)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    loss, ref_loss = (out * cotangent).sum(), (ref_out * cotangent).sum()
    if config.head_balance_loss:
        (coef, balance), = window.terms["balance_loss"]
        assert coef == kwargs.get("aux_loss_coef", 1e-2)
        torch.testing.assert_close(balance, ref_cv2, atol=1e-5, rtol=1e-5)
        loss, ref_loss = loss + 10 * balance, ref_loss + 10 * ref_cv2
    else:
        assert window.terms == {}  # the official HydraLoRA has no auxiliary loss
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref_loss, params)
    for name, g, rg in zip(("x",) + PARAM_NAMES, grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5, msg=lambda m: f"grad of {name}: {m}")


def test_balance_term_ignores_padding():
    model, layer = make_layer(init_weights=False, num_experts=4, head_balance_loss=True)
    x, mask = batch_with_padding()
    layer.train()
    with loss_window.collect(token_mask=mask, collect_routing=True) as window:
        layer(x)
    with loss_window.collect(token_mask=torch.ones_like(mask)) as unmasked:
        layer(x)
    with loss_window.collect(token_mask=torch.ones(int(mask.sum()), dtype=torch.long)) as real_only:
        layer(x.reshape(-1, IN)[mask.reshape(-1).bool()])
    value = window.terms["balance_loss"][0][1]
    torch.testing.assert_close(value, real_only.terms["balance_loss"][0][1])
    assert not torch.allclose(value, unmasked.terms["balance_loss"][0][1])
    assert float(window.routing[layer.moe_layer_name][0]["tokens"]) == float(mask.sum())


def test_identity_at_init_and_merge_refused():
    assert HydraLoRAConfig.identity_at_init and not HydraLoRAConfig.supports_merge
    model, layer = make_layer()
    x = torch.randn(6, IN)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_experts=0), "num_experts"),
    (dict(num_experts="4"), "num_experts"),
    (dict(top_k=2), "top_k"),
    (dict(head_balance_loss=1), "head_balance_loss"),
    (dict(expert_rank=0), "expert_rank"),
    (dict(lora_alpha=0), "lora_alpha"),
    (dict(aux_loss_coef=-0.1), "aux_loss_coef"),
])
def test_invalid_config(kwargs, field):
    with pytest.raises(MoeConfigError, match=f"`{field}`") as info:
        HydraLoRAConfig(**kwargs)
    assert info.value.field == field and "hydralora" in str(info.value)


def test_bf16_forward_and_backward_are_finite():
    model = tiny_llama(torch.bfloat16)
    peft_model = get_peft_model(model, HydraLoRAConfig(target_modules=["q_proj", "k_proj", "v_proj"], expert_rank=2,
                                                       init_weights=False, head_balance_loss=True))
    peft_model.train()
    ids = torch.randint(0, 128, (2, 6))
    with loss_window.collect() as window:
        out = peft_model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    (out.loss + window.weighted_total()).backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "hydralora_router" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_disable_adapter_equals_base_model():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        base = model(ids).logits
        peft_model = get_peft_model(model, HydraLoRAConfig(target_modules=["q_proj", "v_proj"], expert_rank=2,
                                                           init_weights=False))
        assert not torch.equal(peft_model(ids).logits, base)
        with peft_model.disable_adapter():
            assert torch.equal(peft_model(ids).logits, base)


def test_save_and_load_in_fresh_process_is_bit_exact(tmp_path):
    peft_model = get_peft_model(tiny_llama(), HydraLoRAConfig(target_modules=["q_proj", "k_proj", "v_proj"],
                                                              num_experts=3, expert_rank=2, init_weights=False))
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        logits = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "HYDRALORA" and saved_config["num_experts"] == 3
    assert_reloads_bit_exact_in_fresh_process(tmp_path, ids, logits)


def count_ops(num_experts: int) -> int:
    return count_train_ops(HydraLoRAConfig(target_modules=["0"], num_experts=num_experts, expert_rank=2,
                                           init_weights=False, head_balance_loss=True))


def test_op_count_does_not_depend_on_num_experts():
    assert count_ops(4) == count_ops(16)


def test_shared_A_is_applied_once():
    """Compute A once, not once per head: three GEMMs read the input (base, router, shared A) whatever N is."""

    class InputGemms(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("mm", "addmm", "bmm"):
                lhs = args[1] if name == "addmm" else args[0]
                self.count += int(lhs.shape[-1] == IN)  # inner dimension = in_features: this GEMM reads x
            return func(*args, **(kwargs or {}))

    for num_experts in (1, 8):
        _, layer = make_layer(num_experts=num_experts, init_weights=False)
        with torch.no_grad(), InputGemms() as gemms:
            layer(torch.randn(5, IN))
        assert gemms.count == 3
