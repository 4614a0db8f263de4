"""D2MoRA (llamafactory_moe/methods/d2mora.py) against the paper's equations written as per-token, per-pair loops."""

import json

import pytest
import torch
import torch.nn as nn
from peft import get_peft_model

import llamafactory_moe  # noqa: F401  (registers the methods)
from llamafactory_moe.core import MoeConfigError, loss_window
from llamafactory_moe.methods.d2mora import D2MoRAConfig, D2MoRALayer
from tests.methods.common import assert_reloads_bit_exact_in_fresh_process, count_train_ops, tiny_llama

IN, OUT = 24, 20
PARAM_NAMES = ("d2mora_A", "d2mora_B", "d2mora_router_down", "d2mora_router_up")


class Tiny(nn.Module):
    def __init__(self, in_features=IN, out_features=OUT):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.proj(x)


def make_layer(seed=0, in_features=IN, out_features=OUT, **kwargs):
    torch.manual_seed(seed)
    model = get_peft_model(Tiny(in_features, out_features), D2MoRAConfig(target_modules=["proj"], **kwargs))
    return model, model.base_model.model.proj


def batch_with_padding(seed=1):
    torch.manual_seed(seed)
    x = torch.randn(3, 5, IN)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return x, mask


def reference(layer: D2MoRALayer, config: D2MoRAConfig, x: torch.Tensor, input_masks=None):
    """y = W0 x + s * sum_j sum_i g2_j g1_i B_j A_i drop_i(x), token by token, pair by pair.

    ``input_masks`` (tokens, M, in) are the dropout masks of each down-expert (None: no dropout).
    """
    M, N, r, s = config.num_down_experts, config.num_experts, config.expert_rank, config.alpha / config.expert_rank
    base = layer.base_layer
    A, B = layer.d2mora_A["default"], layer.d2mora_B["default"]
    R1, R2 = layer.d2mora_router_down["default"], layer.d2mora_router_up["default"]
    A_ = [A[i * r:(i + 1) * r] for i in range(M)]
    B_ = [B[:, j * r:(j + 1) * r] for j in range(N)]
    outputs = []
    for n, x_n in enumerate(x.reshape(-1, IN)):
        dropped = [x_n if input_masks is None else x_n * input_masks[n, i] for i in range(M)]
        g1 = torch.softmax(R1 @ x_n, dim=-1)  # router 1 on the undropped input
        h = sum(g1[i] * (A_[i] @ dropped[i]) for i in range(M))
        g2 = torch.softmax(R2 @ h, dim=-1)  # router 2 on the mixed code
        y = base.weight @ x_n + base.bias
        for j in range(N):
            for i in range(M):
                y = y + s * g2[j] * g1[i] * (B_[j] @ (A_[i] @ dropped[i]))
        outputs.append(y)
    return torch.stack(outputs).reshape(*x.shape[:-1], OUT)


def reference_diversity(layer: D2MoRALayer, config: D2MoRAConfig):
    """Omega = sum_{i<j} |<a_i/(|a_i|+eps), a_j/(|a_j|+eps)>| over A-experts, plus the same over B-experts."""
    M, N, r = config.num_down_experts, config.num_experts, config.expert_rank
    A, B = layer.d2mora_A["default"], layer.d2mora_B["default"]
    experts_A = [A[i * r:(i + 1) * r].flatten() for i in range(M)]
    experts_B = [B[:, j * r:(j + 1) * r].flatten() for j in range(N)]
    total = torch.zeros(())
    for experts in (experts_A, experts_B):
        unit = [v / (v.norm() + 1e-6) for v in experts]
        for i in range(len(unit)):
            for j in range(i + 1, len(unit)):
                total = total + (unit[i] @ unit[j]).abs()
    return total


class FixedMask(nn.Module):
    """A deterministic stand-in for nn.Dropout: multiplies by a given mask (so the reference can use the same)."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


CASES = [
    dict(num_down_experts=4, num_experts=3, expert_rank=2, lora_alpha=8),
    dict(num_down_experts=3, num_experts=5, expert_rank=1, lora_alpha=3, aux_loss_coef=0.5),
    dict(num_down_experts=1, num_experts=2, expert_rank=3),  # HydraLoRA-like, but router 2 reads h
    dict(num_down_experts=2, num_experts=1, expert_rank=2),
    dict(num_down_experts=3, num_experts=2, expert_rank=2, expert_dropout=0.3),  # shared fixed mask
    dict(num_down_experts=3, num_experts=2, expert_rank=2, expert_dropout=0.3, per_expert_dropout=True),
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_output_gradients_and_diversity_match_reference(kwargs):
    model, layer = make_layer(init_weights=False, **kwargs)
    config = model.peft_config["default"]
    x, mask = batch_with_padding()
    x.requires_grad_(True)
    tokens, M = x.shape[0] * x.shape[1], config.num_down_experts
    input_masks = None
    if config.expert_dropout > 0:
        torch.manual_seed(2)
        if config.per_expert_dropout:
            input_masks = (torch.rand(tokens, M, IN) > 0.3).float() / 0.7  # one mask per (token, expert)
            layer.moe_dropout["default"] = FixedMask(input_masks)
        else:
            shared = (torch.rand(tokens, IN) > 0.3).float() / 0.7
            input_masks = shared.unsqueeze(1).expand(tokens, M, IN)
            layer.moe_dropout["default"] = FixedMask(shared)
    cotangent = torch.randn(3, 5, OUT)
    params = [x] + [getattr(layer, name)["default"] for name in PARAM_NAMES]

    layer.train()
    with loss_window.collect(token_mask=mask) as window:
        out = layer(x)
    (coef, diversity), = window.terms["diversity_loss"]
    assert coef == config.effective_aux_loss_coef == kwargs.get("aux_loss_coef", 1e-4)
    ref_out = reference(layer, config, x, input_masks)
    ref_diversity = reference_diversity(layer, config)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diversity, ref_diversity, atol=1e-5, rtol=1e-5)

    loss = (out * cotangent).sum() + 10 * diversity
    ref_loss = (ref_out * cotangent).sum() + 10 * ref_diversity
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref_loss, params)
    for name, g, rg in zip(("x",) + PARAM_NAMES, grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5, msg=lambda m: f"grad of {name}: {m}")


def test_diversity_is_summed_over_layers_and_ignores_padding():
    model = tiny_llama()
    peft_model = get_peft_model(model, D2MoRAConfig(target_modules=["q_proj", "k_proj", "v_proj"], expert_rank=2,
                                                    init_weights=False))
    layers = [m for m in peft_model.modules() if isinstance(m, D2MoRALayer)]
    config = peft_model.peft_config["default"]
    ids = torch.randint(0, 128, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 2:] = 0
    peft_model.train()
    with loss_window.collect(token_mask=mask, collect_routing=True) as window:
        peft_model(ids, attention_mask=mask)
    expected = sum(reference_diversity(layer, config) for layer in layers).detach()
    assert len(window.terms["diversity_loss"]) == 6
    torch.testing.assert_close(window.weighted_total(), 1e-4 * expected, atol=1e-9, rtol=1e-5)
    assert window.detached_terms()["diversity_loss"] == pytest.approx(1e-4 * expected.item(), rel=1e-5)
    # Routing statistics (router 2) count only the 8 real tokens.
    stats = window.routing[layers[0].moe_layer_name][0]
    assert float(stats["tokens"]) == 8.0 and stats["load"].shape == (config.num_experts,)


def test_b_term_and_its_gradient_are_zero_at_init():
    _, layer = make_layer(num_down_experts=3, num_experts=3, expert_rank=2)
    assert torch.count_nonzero(layer.d2mora_B["default"]) == 0
    layer.train()
    with loss_window.collect() as window:
        layer(torch.randn(4, IN))
    (_, diversity), = window.terms["diversity_loss"]
    A = layer.d2mora_A["default"]
    A_only = sum((A[i * 2:(i + 1) * 2].flatten() / (A[i * 2:(i + 1) * 2].norm() + 1e-6)
                  @ (A[j * 2:(j + 1) * 2].flatten() / (A[j * 2:(j + 1) * 2].norm() + 1e-6))).abs()
                 for i in range(3) for j in range(i + 1, 3))
    torch.testing.assert_close(diversity, A_only)
    grad_B, = torch.autograd.grad(diversity, [layer.d2mora_B["default"]])
    assert torch.count_nonzero(grad_B) == 0  # finite zero, not NaN


def test_no_diversity_term_in_eval_or_with_zero_coefficient():
    _, layer = make_layer(init_weights=False)
    layer.eval()
    with loss_window.collect() as window:
        layer(torch.randn(4, IN))
    assert window.terms == {}
    _, layer = make_layer(init_weights=False, aux_loss_coef=0.0)
    layer.train()
    with loss_window.collect() as window:
        layer(torch.randn(4, IN))
    assert window.terms == {}


def test_per_expert_dropout_draws_independent_masks():
    """A_i = I, uniform router 1, one B = I: the output is the mean of the experts' dropped inputs."""
    torch.manual_seed(0)
    M, d = 4, 8
    model, layer = make_layer(in_features=d, out_features=d, num_down_experts=M, num_experts=1, expert_rank=d,
                              lora_alpha=d, expert_dropout=0.5, per_expert_dropout=True)
    with torch.no_grad():
        layer.d2mora_A["default"].copy_(torch.eye(d).repeat(M, 1))
        layer.d2mora_router_down["default"].zero_()
        layer.d2mora_B["default"].copy_(torch.eye(d))
        layer.base_layer.weight.zero_()
        layer.base_layer.bias.zero_()
    x = torch.ones(2000, d)
    layer.train()
    with torch.no_grad():
        out = layer(x)
    # Dropped inputs are 0 or 2; a shared mask gives only {0, 2}, independent masks give multiples of 2/M.
    assert set(torch.unique(out).tolist()) == {0.0, 0.5, 1.0, 1.5, 2.0}
    assert out.mean().item() == pytest.approx(1.0, abs=0.02)
    model.peft_config["default"].per_expert_dropout = False
    with torch.no_grad():
        assert set(torch.unique(layer(x)).tolist()) == {0.0, 2.0}
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x)  # no dropout in eval


def test_identity_at_init():
    assert D2MoRAConfig.identity_at_init and not D2MoRAConfig.supports_merge
    _, layer = make_layer()
    x = torch.randn(6, IN)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_experts=0), "num_experts"),
    (dict(num_down_experts=0), "num_down_experts"),
    (dict(num_down_experts=2.5), "num_down_experts"),
    (dict(top_k=2), "top_k"),
    (dict(per_expert_dropout="yes"), "per_expert_dropout"),
    (dict(expert_rank=0), "expert_rank"),
    (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
    (dict(expert_dropout=1.0), "expert_dropout"),
])
def test_invalid_config(kwargs, field):
    with pytest.raises(MoeConfigError, match=f"`{field}`") as info:
        D2MoRAConfig(**kwargs)
    assert info.value.field == field and "d2mora" in str(info.value)


def test_merge_is_refused_clearly():
    model, _ = make_layer(init_weights=False)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()


def test_bf16_forward_and_backward_are_finite():
    model = tiny_llama(torch.bfloat16)
    peft_model = get_peft_model(model, D2MoRAConfig(target_modules=["q_proj", "k_proj", "v_proj"], expert_rank=2,
                                                    init_weights=False, expert_dropout=0.1, per_expert_dropout=True))
    peft_model.train()
    ids = torch.randint(0, 128, (2, 6))
    with loss_window.collect() as window:
        out = peft_model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    (out.loss + window.weighted_total()).backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "d2mora_router" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_disable_adapter_equals_base_model():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        base = model(ids).logits
        peft_model = get_peft_model(model, D2MoRAConfig(target_modules=["q_proj", "v_proj"], expert_rank=2,
                                                        init_weights=False))
        assert not torch.equal(peft_model(ids).logits, base)
        with peft_model.disable_adapter():
            assert torch.equal(peft_model(ids).logits, base)


def test_save_and_load_in_fresh_process_is_bit_exact(tmp_path):
    peft_model = get_peft_model(tiny_llama(), D2MoRAConfig(target_modules=["q_proj", "k_proj", "v_proj"],
                                                           num_down_experts=3, num_experts=2, expert_rank=2,
                                                           per_expert_dropout=True, init_weights=False))
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        logits = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "D2MORA"
    assert (saved_config["num_down_experts"], saved_config["num_experts"]) == (3, 2)
    assert_reloads_bit_exact_in_fresh_process(tmp_path, ids, logits)


def count_ops(num_experts: int, **kwargs) -> int:
    return count_train_ops(D2MoRAConfig(target_modules=["0"], num_down_experts=num_experts, num_experts=num_experts,
                                        expert_rank=2, init_weights=False, **kwargs))


@pytest.mark.parametrize("kwargs", [dict(), dict(expert_dropout=0.1, per_expert_dropout=True)],
                         ids=["shared-mask", "per-expert-masks"])
def test_op_count_does_not_depend_on_num_experts(kwargs):
    assert count_ops(4, **kwargs) == count_ops(16, **kwargs)
