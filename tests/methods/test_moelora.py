"""MoELoRA (llamafactory_moe/methods/moelora.py) against its equations written as per-token, per-expert loops.

    p(x) = softmax(W_g x)                                    top-k of p, renormalised (soft routing: all of p)
    y    = W0 x + b + (alpha / r) * sum_e w_e(x) B_e A_e dropout(x)
    L    = aux_loss_coef * E * sum_e f_e P_e                 over the non-padding tokens (none with soft routing)

Ties go to the lower expert index (the method file's documented tie-break).
"""

import pytest
import torch
import torch.nn as nn
from peft import get_peft_model

import llamafactory_moe  # noqa: F401  (registers the methods)
from llamafactory_moe.core import loss_window
from llamafactory_moe.methods.moelora import MoELoRAConfig, MoELoRALayer

IN, OUT = 24, 20
PARAMS = ("moelora_A", "moelora_B", "moelora_router")
TOL = dict(atol=1e-5, rtol=1e-5)


def make_layer(seed=0, **kwargs) -> MoELoRALayer:
    torch.manual_seed(seed)
    model = get_peft_model(nn.Sequential(nn.Linear(IN, OUT)), MoELoRAConfig(target_modules=["0"], **kwargs))
    layer = model.base_model.model[0]
    layer.train()
    return layer


def batch_with_padding(seed=1):
    torch.manual_seed(seed)
    x = torch.randn(3, 5, IN)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0  # right padding
    mask[2, 1:] = 0  # a row with one real token
    return x, mask


def top_k_experts(p: torch.Tensor, k: int, ties_to_higher: bool = False) -> list[int]:
    """The k experts with the highest probability; equal probabilities go to the lower index (``ties_to_higher``:
    to the higher one, for the negative control)."""
    order = list(range(len(p)))
    for i in range(len(order)):  # selection sort: strictly greater wins, so an equal later expert never overtakes
        best = i
        for j in range(i + 1, len(order)):
            if p[order[j]] > p[order[best]] or (ties_to_higher and p[order[j]] == p[order[best]]):
                best = j
        order[i], order[best] = order[best], order[i]
    return sorted(order[:k])


def reference(layer: MoELoRALayer, config: MoELoRAConfig, x: torch.Tensor, mask: torch.Tensor,
              dropped: torch.Tensor = None, count_padding: bool = False, renormalise: bool = True,
              ties_to_higher: bool = False):
    """The layer token by token, expert by expert. ``dropped``: the experts' (dropout) input, default ``x``. The other
    flags give wrong variants for negative controls."""
    E, r = config.num_experts, config.expert_rank
    k = E if config.top_k is None else config.top_k
    scale = config.alpha / r
    W0, b0 = layer.base_layer.weight, layer.base_layer.bias
    A, B, router = (getattr(layer, name)["default"] for name in PARAMS)
    tokens, dropped_tokens = x.reshape(-1, IN), (x if dropped is None else dropped).reshape(-1, IN)
    outputs, probs, chosen = [], [], []
    for x_n, d_n in zip(tokens, dropped_tokens):
        logits = torch.stack([router[e] @ x_n for e in range(E)])
        p = torch.exp(logits - logits.max())
        p = p / p.sum()
        top = top_k_experts(p.detach(), k, ties_to_higher)
        total = sum(p[e] for e in top) if renormalise else 1.0
        y = W0 @ x_n + b0
        for e in top:
            y = y + (p[e] / total) * scale * (B[:, e * r:(e + 1) * r] @ (A[e * r:(e + 1) * r] @ d_n))
        outputs.append(y)
        probs.append(p)
        chosen.append([float(e in top) for e in range(E)])
    real = [i for i, m in enumerate(mask.reshape(-1).tolist()) if m or count_padding]
    f = [sum(chosen[i][e] for i in real) / len(real) for e in range(E)]
    P = [sum(probs[i][e] for i in real) / len(real) for e in range(E)]
    balance = E * sum(f[e] * P[e] for e in range(E))
    return torch.stack(outputs).reshape(*x.shape[:-1], OUT), balance, chosen


def run_layer(layer, x, mask):
    with loss_window.collect(token_mask=mask, collect_routing=True) as window:
        out = layer(x)
    return out, window.terms.get("balance_loss", []), window.routing


CASES = [
    dict(num_experts=4, top_k=2, expert_rank=2, lora_alpha=8),
    dict(num_experts=3, top_k=1, expert_rank=3),  # alpha defaults to 2 r
    dict(num_experts=5, top_k=3, expert_rank=1, lora_alpha=3, aux_loss_coef=0.5),
    dict(num_experts=4, top_k=None, expert_rank=2, lora_alpha=4),  # soft routing
    dict(num_experts=3, top_k=3, expert_rank=2),  # top_k == num_experts: soft routing too
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_output_balance_loss_and_gradients_match_reference(kwargs):
    layer = make_layer(init_weights=False, **kwargs)
    config = layer.moe_config["default"]
    with torch.no_grad():
        layer.moelora_router["default"].mul_(4.0)  # a sharper router: the top-k sets vary across tokens
    x, mask = batch_with_padding()
    x.requires_grad_(True)
    params = [x] + [getattr(layer, name)["default"] for name in PARAMS]
    out, terms, routing = run_layer(layer, x, mask)
    ref_out, ref_balance, chosen = reference(layer, config, x, mask)
    torch.testing.assert_close(out, ref_out, **TOL)

    soft = config.top_k is None or config.top_k == config.num_experts
    cotangent = torch.randn_like(out)
    if soft:  # every expert takes every token: the Switch loss is the constant E, so none is recorded
        assert terms == [] and all(sum(c) == config.num_experts for c in chosen)
        loss, ref_loss = (out * cotangent).sum(), (ref_out * cotangent).sum()
    else:
        (coef, balance), = terms
        assert coef == (0.5 if "aux_loss_coef" in kwargs else 1e-2)
        torch.testing.assert_close(balance, ref_balance, **TOL)
        # Non-vacuous: tokens differ in their expert sets, and the padding tokens change the loss if counted.
        assert len({tuple(c) for c in chosen}) > 1
        _, with_padding, _ = reference(layer, config, x, mask, count_padding=True)
        assert abs(with_padding.item() - ref_balance.item()) > 1e-3
        unnormalised, _, _ = reference(layer, config, x, mask, renormalise=False)
        assert not torch.allclose(unnormalised, out, **TOL)  # the renormalisation is checked, not a no-op
        loss = (out * cotangent).sum() + 10 * balance
        ref_loss = (ref_out * cotangent).sum() + 10 * ref_balance
    # The routing log counts the same selection (padding excluded).
    (record,) = routing[layer.moe_layer_name]
    real = mask.reshape(-1).bool().tolist()
    expected_load = [sum(c[e] for c, keep in zip(chosen, real) if keep) for e in range(config.num_experts)]
    assert record["load"].tolist() == expected_load

    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref_loss, params)
    for name, g, rg in zip(("x",) + PARAMS, grads, ref_grads):
        assert rg.abs().max() > 0, name  # every parameter takes part
        torch.testing.assert_close(g, rg, **TOL, msg=lambda m: f"grad of {name}: {m}")


def test_expert_dropout_applies_to_the_experts_input_only():
    """The router reads x, the experts one shared dropout mask of x (as nn.Dropout draws it)."""
    layer = make_layer(init_weights=False, num_experts=4, top_k=2, expert_rank=2, expert_dropout=0.3)
    config = layer.moe_config["default"]
    x, mask = batch_with_padding()
    x.requires_grad_(True)
    torch.manual_seed(7)
    out, ((_, balance),), _ = run_layer(layer, x, mask)
    torch.manual_seed(7)  # the router draws nothing: the dropout's mask is the first draw
    keep = nn.functional.dropout(torch.ones(x.shape[0] * x.shape[1], IN), p=0.3, training=True)
    assert 0 < (keep == 0).float().mean() < 1
    ref_out, ref_balance, _ = reference(layer, config, x, mask, dropped=x * keep.reshape(x.shape))
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(balance, ref_balance, **TOL)
    _, ref_undropped, _ = reference(layer, config, x, mask)
    assert not torch.allclose(ref_undropped, ref_out, **TOL)  # the mask really changed the output
    params = [x] + [getattr(layer, name)["default"] for name in PARAMS]
    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad((out * cotangent).sum() + balance, params)
    ref_grads = torch.autograd.grad((ref_out * cotangent).sum() + ref_balance, params)
    for name, g, rg in zip(("x",) + PARAMS, grads, ref_grads):
        torch.testing.assert_close(g, rg, **TOL, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("top_k", [1, 2])
def test_exact_ties_go_to_the_lower_expert_index(top_k):
    """Experts 1 and 2 have the same router row, so their scores tie exactly on every token."""
    layer = make_layer(init_weights=False, num_experts=4, top_k=top_k, expert_rank=2)
    config = layer.moe_config["default"]
    with torch.no_grad():
        router = layer.moelora_router["default"]
        router.mul_(4.0)
        router[2] = router[1]
    x, mask = batch_with_padding()
    out, ((_, balance),), routing = run_layer(layer, x, mask)
    ref_out, ref_balance, chosen = reference(layer, config, x, mask)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(balance, ref_balance, **TOL)
    # Expert 2 never wins a tie with expert 1: it is used only when both fit into the top-k.
    straddled = [c for c in chosen if c[1] != c[2]]
    assert straddled and all(c[1] == 1.0 and c[2] == 0.0 for c in straddled)
    (record,) = routing[layer.moe_layer_name]
    real = mask.reshape(-1).bool().tolist()
    assert record["load"].tolist() == [sum(c[e] for c, keep in zip(chosen, real) if keep) for e in range(4)]
    assert record["load"][1] > record["load"][2]
    # Negative control: the opposite tie-break gives another output (experts 1 and 2 have different A and B; the
    # balance loss cannot tell them apart, their mean probabilities being equal).
    wrong_out, _, _ = reference(layer, config, x, mask, ties_to_higher=True)
    assert not torch.allclose(wrong_out, out, **TOL)
