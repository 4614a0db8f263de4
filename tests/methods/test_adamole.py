"""AdaMoLE (llamafactory_moe/methods/adamole.py) against the paper's equations written as per-token loops."""


import pytest
import torch
import torch.nn as nn
from peft import get_peft_model

import llamafactory_moe  # noqa: F401  (registers the methods)
from llamafactory_moe.core import MoeConfigError, loss_window
from llamafactory_moe.methods.adamole import AdaMoLEConfig, AdaMoLELayer
from tests.methods.common import assert_reloads_bit_exact_in_fresh_process, count_train_ops, tiny_llama

IN, OUT = 24, 20
PARAMS = ("adamole_A", "adamole_B", "adamole_router", "adamole_threshold", "adamole_threshold_bias")


def make_layer(seed=0, in_features=IN, out_features=OUT, **kwargs) -> tuple[nn.Module, AdaMoLELayer]:
    torch.manual_seed(seed)
    model = get_peft_model(nn.Sequential(nn.Linear(in_features, out_features)),
                           AdaMoLEConfig(target_modules=["0"], **kwargs))
    return model, model.base_model.model[0]


def batch_with_padding(seed=1, scale=1.0):
    torch.manual_seed(seed)
    x = scale * torch.randn(3, 5, IN)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return x, mask


def reference(layer: AdaMoLELayer, config: AdaMoLEConfig, x: torch.Tensor, mask: torch.Tensor):
    """The paper's AdaMoLE layer token by token, expert by expert (with the top-1 fallback)."""
    E, r, s = config.num_experts, config.expert_rank, config.alpha / config.expert_rank
    tau_max = 1 / E if config.max_threshold is None else config.max_threshold
    A, B, router, w_t, b_t = (getattr(layer, name)["default"] for name in PARAMS)
    outputs, scores, chosen, fallbacks = [], [], [], 0
    for x_n in x.reshape(-1, IN):
        p = torch.softmax(router @ x_n, dim=-1)
        tau = tau_max * torch.sigmoid(w_t[0] @ x_n + b_t[0])
        a = p - tau
        active = [e for e in range(E) if a[e] >= 0]
        total = sum((a[e] for e in active), torch.tensor(0.0))
        if total > 0:
            weights = {e: a[e] / total for e in active}
        else:  # nothing cleared the threshold: the top-1 expert alone
            fallbacks += 1
            active = [int(torch.argmax(p))]
            weights = {active[0]: torch.tensor(1.0)}
        y = layer.base_layer.weight @ x_n + layer.base_layer.bias
        for e, w_e in weights.items():
            y = y + w_e * s * B[:, e * r:(e + 1) * r] @ (A[e * r:(e + 1) * r] @ x_n)
        outputs.append(y)
        scores.append(a)
        chosen.append(torch.tensor([float(e in active) for e in range(E)]))
    real = mask.reshape(-1).bool()
    f = torch.stack(chosen)[real].mean(0)
    mean_score = torch.stack(scores)[real].mean(0)
    balance = E * (f * mean_score).sum()
    return torch.stack(outputs).reshape(*x.shape[:-1], OUT), balance, torch.stack(chosen), fallbacks


def run_layer(layer, x, mask):
    layer.train()
    with loss_window.collect(token_mask=mask) as window:
        out = layer(x)
    (coef, balance), = window.terms["balance_loss"]
    return out, balance, coef


CASES = [  # (config kwargs, router gain, threshold bias shift)
    (dict(num_experts=4, expert_rank=2, lora_alpha=8), 6.0, 0.0),  # tau_max = 1/E
    (dict(num_experts=6, expert_rank=1, lora_alpha=3, max_threshold=0.05), 6.0, 0.0),
    (dict(num_experts=4, expert_rank=3, max_threshold=0.9), 3.0, 1.5),  # > 1/E: some tokens use the fallback
]


@pytest.mark.parametrize("kwargs, router_gain, bias_shift", CASES, ids=["default", "low-threshold", "fallback"])
def test_output_gradients_and_aux_match_reference(kwargs, router_gain, bias_shift):
    model, layer = make_layer(init_weights=False, **kwargs)
    config = model.peft_config["default"]
    with torch.no_grad():  # a sharper router, so activation sets vary across tokens
        layer.adamole_router["default"].mul_(router_gain)
        layer.adamole_threshold_bias["default"].add_(bias_shift)
    x, mask = batch_with_padding()
    x.requires_grad_(True)
    params = [x] + [getattr(layer, name)["default"] for name in PARAMS]
    out, balance, coef = run_layer(layer, x, mask)
    ref_out, ref_balance, chosen, fallbacks = reference(layer, config, x, mask)
    assert coef == 1e-3
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(balance, ref_balance, atol=1e-5, rtol=1e-5)
    if config.max_threshold is None or config.max_threshold <= 1 / config.num_experts:
        assert fallbacks == 0 and chosen.sum(-1).max() > 1  # the threshold really varies the active set
    else:
        assert 0 < fallbacks < x.shape[0] * x.shape[1]  # a mix of thresholded and fallback tokens

    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad((out * cotangent).sum() + 10 * balance, params)
    ref_grads = torch.autograd.grad((ref_out * cotangent).sum() + 10 * ref_balance, params)
    for name, g, rg in zip(("x",) + PARAMS, grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5, msg=lambda m: f"grad of {name}: {m}")


def test_aux_loss_ignores_padding_tokens():
    _, layer = make_layer(init_weights=False, num_experts=4, expert_rank=2)
    x, mask = batch_with_padding()
    _, balance, _ = run_layer(layer, x, mask)
    x_changed = x.clone()
    x_changed[mask == 0] = 100.0 * torch.randn_like(x_changed[mask == 0])
    _, balance_changed, _ = run_layer(layer, x_changed, mask)
    torch.testing.assert_close(balance, balance_changed)


def test_no_expert_passing_falls_back_to_exactly_top1():
    _, layer = make_layer(init_weights=False, num_experts=4, expert_rank=2, max_threshold=0.9)
    with torch.no_grad():
        layer.adamole_threshold["default"].zero_()
        layer.adamole_threshold_bias["default"].fill_(30.0)  # tau = 0.9 > every p_e < 0.9
    x = torch.randn(7, IN)
    p = torch.softmax(x @ layer.adamole_router["default"].T, dim=-1)
    assert (p < 0.9).all()
    top = p.argmax(-1)
    with torch.no_grad():
        out = layer(x)
    A, B = layer.adamole_A["default"], layer.adamole_B["default"]
    expected = torch.stack([layer.base_layer(x[n]) + 4.0 / 2 * B[:, 2 * e:2 * e + 2] @ (A[2 * e:2 * e + 2] @ x[n])
                            for n, e in enumerate(top.tolist())])  # alpha defaults to 2 * rank: scaling 2
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_degenerate_zero_total_is_finite_and_gives_zero_weights_as_upstream():
    # Zero router -> p = 1/E exactly; sigmoid(60) == 1.0 in fp32 -> tau = 1/E exactly: every a_e = 0, sum = 0.
    # Every expert is active (a_e >= 0) with weight 0; upstream divides by 1 there, so the update is 0.
    _, layer = make_layer(init_weights=False, num_experts=4, expert_rank=2)
    with torch.no_grad():
        layer.adamole_router["default"].zero_()
        layer.adamole_threshold["default"].zero_()
        layer.adamole_threshold_bias["default"].fill_(60.0)
    x, mask = batch_with_padding()
    x.requires_grad_(True)
    out, balance, _ = run_layer(layer, x, mask)
    torch.testing.assert_close(out, layer.base_layer(x), atol=1e-6, rtol=1e-6)
    params = [x] + [getattr(layer, name)["default"] for name in PARAMS]
    grads = torch.autograd.grad(out.sum() + balance, params)
    assert all(torch.isfinite(g).all() for g in grads)


def test_extreme_inputs_give_finite_outputs_and_gradients():
    _, layer = make_layer(init_weights=False, num_experts=4, expert_rank=2)
    x, mask = batch_with_padding(scale=1e4)
    x.requires_grad_(True)
    out, balance, _ = run_layer(layer, x, mask)
    assert torch.isfinite(out).all() and torch.isfinite(balance)
    params = [x] + [getattr(layer, name)["default"] for name in PARAMS]
    grads = torch.autograd.grad(out.sum() / 1e8 + balance, params)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_threshold=0.0), "max_threshold"),
    (dict(max_threshold=-0.1), "max_threshold"),
    (dict(max_threshold=1.5), "max_threshold"),
    (dict(max_threshold="high"), "max_threshold"),
    (dict(num_experts=0), "num_experts"),
    (dict(expert_dropout=1.0), "expert_dropout"),
])
def test_invalid_config(kwargs, field):
    with pytest.raises(MoeConfigError, match=f"`{field}`") as info:
        AdaMoLEConfig(**kwargs)
    assert info.value.field == field


def test_top_k_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="`top_k`"):
        AdaMoLEConfig(top_k=2)


def test_identity_at_init_and_disable_adapter():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        base = model(ids).logits
        peft_model = get_peft_model(model, AdaMoLEConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                         expert_rank=2))
        torch.testing.assert_close(peft_model(ids).logits, base, atol=0, rtol=0)  # B = 0
        for name, param in peft_model.named_parameters():
            if "adamole_B" in name:
                param.normal_()
        assert not torch.equal(peft_model(ids).logits, base)
        with peft_model.disable_adapter():
            assert torch.equal(peft_model(ids).logits, base)


def test_bf16_forward_is_finite():
    peft_model = get_peft_model(tiny_llama(torch.bfloat16),
                                AdaMoLEConfig(target_modules=["q_proj", "v_proj"], expert_rank=2, init_weights=False))
    logits = peft_model(torch.randint(0, 128, (2, 6))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_save_and_load_in_fresh_process_is_bit_exact(tmp_path):
    peft_model = get_peft_model(tiny_llama(), AdaMoLEConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                            expert_rank=2, max_threshold=0.2, init_weights=False))
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        logits = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    assert_reloads_bit_exact_in_fresh_process(tmp_path, ids, logits)


def count_ops(num_experts: int) -> int:
    return count_train_ops(AdaMoLEConfig(target_modules=["0"], num_experts=num_experts, expert_rank=2,
                                         init_weights=False))


def test_op_count_does_not_depend_on_num_experts():
    assert count_ops(4) == count_ops(16)
