"""S'MoRE (llamafactory_moe/methods/smore.py) against spec §B.5-B.7 written as a per-token recursive tree walk."""

import itertools
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

import llamafactory_moe  # noqa: F401  (registers the methods)
from llamafactory_moe.core import MoeConfigError, loss_window
from llamafactory_moe.methods.smore import SMoREConfig, SMoRELayer
from tests.methods.common import assert_reloads_bit_exact_in_fresh_process, count_train_ops, tiny_llama

IN, OUT = 10, 7
GATES = ("switch", "noisy_topk", "dense")
POSITIONS = ("all", "child_v2", "child")
INITS = ("w_final_zero", "eq_1_layer", "normal", "b_zero", "bw_zero")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.proj(x)


def make_layer(seed=0, perturb=True, **kwargs) -> tuple[SMoRELayer, SMoREConfig]:
    """A wrapped Linear; `perturb` adds noise to every adapter weight so no init leaves a zero path."""
    torch.manual_seed(seed)
    config = SMoREConfig(target_modules=["proj"], **kwargs)
    layer = get_peft_model(Tiny(), config).base_model.model.proj
    if perturb:
        with torch.no_grad():
            for p in layer.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p))
    return layer, layer.moe_config["default"]


def batch_with_padding(seed=1):
    torch.manual_seed(seed)
    x = torch.randn(2, 4, IN)
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[0, 3:] = 0
    mask[1, 1:] = 0
    return x, mask


# -- the reference: spec §B.5 per token, §B.7 per (token, path) -------------------------------------------------------
def act(name, t, slope=None):
    name = name.split("|")[0]
    return {"identity": t, "tanh": torch.tanh(t), "relu": torch.clamp(t, min=0),
            "prelu": torch.where(t >= 0, t, slope * t) if slope is not None else t}[name]


def unit(v):
    return v / torch.clamp(v.norm(), min=1e-12)


def reference(layer, config, x, mask, noises=None, training=True):
    """Returns (output (N, OUT), {term: [value per gate, top-down]}). `noises[l]`: (N, P_l, s_l) standard normals."""
    E, R = layer.smore_experts["default"], layer.smore_router["default"]
    L, fan = config.num_layers, config.fan_out
    xs, valid = x.reshape(-1, IN), mask.reshape(-1).bool()
    decisions = {level: [] for level in range(L)}  # per gate: (valid, probs/clean, noisy, std, order, chosen, alphas)

    def expert(level, e, xn):
        p = 0 if config.shared_expert_pool else level
        code = E[f"A_{p}"][e] @ xn + E[f"A_bias_{p}"][e]
        return config.layer_scaling[level] * (E[f"B_{p}"][e] @ code + E[f"B_bias_{p}"][e])

    def choose(level, q, n, path):
        s, k, keys = config.layer_num_experts[level], fan[level], R[f"keys_{level}"]
        h = q
        if config.gate_arch == "mlp":
            h = R[f"mlp_in_{level}"] @ q + R[f"mlp_in_bias_{level}"]
            h = act(config.gate_act_fn, h, R[f"act_{level}"] if f"act_{level}" in R else None)
            h = R[f"mlp_out_{level}"] @ h + R[f"mlp_out_bias_{level}"]
        if config.gate_type == "noisy_topk":
            clean = torch.stack([unit(h) @ unit(keys[e]) for e in range(s)])
            std = noisy = None
            noisy = clean
            if training:
                std = F.softplus(R[f"noise_{level}"] @ q) + 0.01
                noisy = clean + noises[level][n, path] * std
            order = sorted(range(s), key=lambda e: -noisy[e].item())
            chosen = order[:k]
            top = torch.stack([noisy[e] for e in chosen])
            alphas = torch.softmax(top, 0) if k > 1 else top
            out_keys = [unit(keys[e]) for e in chosen]
            decisions[level].append((valid[n], clean, noisy, std, order, chosen, alphas))
        else:
            probs = torch.softmax(torch.stack([h @ keys[e] for e in range(s)]), 0)
            order = sorted(range(s), key=lambda e: -probs[e].item())
            chosen = list(range(s)) if config.gate_type == "dense" else order[:k]
            alphas = torch.stack([probs[e] for e in chosen])
            if config.gate_type == "switch" and k > 1:
                alphas = alphas / alphas.sum()
            out_keys = [keys[e] for e in chosen]
            decisions[level].append((valid[n], probs, None, None, order, chosen, alphas))
        return list(zip(chosen, alphas, out_keys))

    def walk(level, q, n, path):  # the state x_{l+1} of one parent whose children are chosen at layer `level`
        total = 0
        for j, (e, a, key) in enumerate(choose(level, q, n, path)):
            z = expert(level, e, xs[n])
            slope = E[f"act_{level}"] if f"act_{level}" in E else None
            child = walk(level - 1, torch.cat([q, key]), n, path * fan[level] + j) if level > 0 else None
            W = (E[f"W_{level}"], E[f"W_bias_{level}"]) if level > 0 else None
            if config.activation_position == "all":
                message = a * act(config.expert_act_fn, z if child is None else z + W[0] @ child + W[1], slope)
            elif config.activation_position == "child_v2":
                message = a * (z if child is None else z + W[0] @ act(config.expert_act_fn, child, slope) + W[1])
            else:
                message = a * z if child is None else a * z + W[0] @ act(config.expert_act_fn, child, slope) + W[1]
            total = total + message
        return total

    outputs = []
    for n in range(xs.shape[0]):
        q = R["down"] @ xs[n] + R["down_bias"] if config.router_down_dim else xs[n]
        outputs.append(E["W_proj"] @ walk(L - 1, q, n, 0) + E["W_proj_bias"])

    terms = {}
    coef = config.effective_aux_loss_coef
    for level in reversed(range(L)):  # the layer records top-down
        rows = [r for r in decisions[level] if r[0]]
        s, k = config.layer_num_experts[level], fan[level]
        if config.gate_type == "switch":
            frac = torch.stack([torch.tensor([float(e in r[5]) for e in range(s)]) for r in rows]).mean(0)
            prob = torch.stack([r[1] for r in rows]).mean(0)
            terms.setdefault("balance_loss", []).append((coef, s * (frac * prob).sum()))
        elif config.gate_type == "noisy_topk" and training:
            importance, load = torch.zeros(s), torch.zeros(s)
            for _, clean, noisy, std, order, chosen, alphas in rows:
                for j, e in enumerate(chosen):
                    importance = importance + F.one_hot(torch.tensor(e), s) * alphas[j]
                for e in range(s):
                    if k == s:
                        load = load + F.one_hot(torch.tensor(e), s)
                        continue
                    in_top = noisy[e] > noisy[order[k]]
                    threshold = noisy[order[k]] if in_top else noisy[order[k - 1]]
                    normal = torch.distributions.Normal(0.0, 1.0)
                    load = load + F.one_hot(torch.tensor(e), s) * normal.cdf((clean[e] - threshold) / std[e])

            def cv2(v):
                return v.var() / (v.mean() ** 2 + 1e-10)
            terms.setdefault("importance_loss", []).append((coef, cv2(importance)))
            terms.setdefault("load_loss", []).append((coef, cv2(load)))
    return torch.stack(outputs), terms


def trainable(layer):
    return {n: p for n, p in layer.named_parameters() if p.requires_grad}


def run_and_compare(layer, config, seed=7):
    x, mask = batch_with_padding()
    x.requires_grad_(True)
    layer.train()
    torch.manual_seed(seed)
    with loss_window.collect(token_mask=mask) as window:
        out = layer(x) - layer.base_layer(x)
    L = config.num_layers
    torch.manual_seed(seed)  # the layer draws its gate noise top-down, one (N, P_l, s_l) normal tensor per gate
    noises = {}
    for level in reversed(range(L)):
        paths = 1 if level == L - 1 else int(torch.tensor(config.fan_out[level + 1:]).prod())
        noises[level] = torch.randn(x.shape[0] * x.shape[1], paths, config.layer_num_experts[level])
    x_ref = x.detach().clone().requires_grad_(True)
    expected, expected_terms = reference(layer, config, x_ref, mask, noises)
    torch.testing.assert_close(out.reshape(-1, OUT), expected, atol=1e-5, rtol=1e-5)
    assert set(window.terms) == set(expected_terms)
    for term, values in expected_terms.items():
        got = window.terms[term]
        assert len(got) == len(values)
        for (c1, v1), (c2, v2) in zip(got, values):
            assert c1 == c2
            torch.testing.assert_close(v1, v2.to(v1.dtype), atol=1e-5, rtol=1e-5)

    params = trainable(layer)
    probe = torch.randn_like(expected)
    losses = [((out.reshape(-1, OUT) * probe).sum(), (expected * probe).sum())]
    if expected_terms:
        losses.append((window.weighted_total(), sum(c * v for vals in expected_terms.values() for c, v in vals)))
    for got_loss, ref_loss in losses:
        got = torch.autograd.grad(got_loss, [x] + list(params.values()), retain_graph=True, allow_unused=True)
        ref = torch.autograd.grad(ref_loss, [x_ref] + list(params.values()), retain_graph=True, allow_unused=True)
        for name, g1, g2 in zip(["input"] + list(params), got, ref):
            if g1 is None or g2 is None:
                assert g1 is None and g2 is None or (g1 if g2 is None else g2).abs().max() == 0, name
                continue
            torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    return out


SHAPES = {False: dict(layer_num_experts=[3, 2], layer_top_k=[2, 1], layer_ranks=[2, 3]),
          True: dict(layer_num_experts=[3, 3], layer_top_k=[2, 1], layer_ranks=[2, 2])}


@pytest.mark.parametrize("gate, position, init, shared",
                         list(itertools.product(GATES, POSITIONS, INITS, (False, True))))
def test_output_gradients_and_aux_match_reference(gate, position, init, shared):
    layer, config = make_layer(gate_type=gate, activation_position=position, init_method=init,
                               shared_expert_pool=shared, gate_dims=[4], router_down_dim=5, aux_loss_coef=0.5,
                               **SHAPES[shared])
    run_and_compare(layer, config)


@pytest.mark.parametrize("kwargs", [
    dict(gate_type="switch", expert_act_fn="identity", gate_act_fn="tanh", gate_arch="linear"),
    dict(gate_type="dense", expert_act_fn="relu", gate_act_fn="identity", gate_arch="linear", router_down_dim=None),
    dict(gate_type="noisy_topk", expert_act_fn="prelu|0.1", gate_act_fn="prelu", gate_dims=[3, 4, 5]),
    dict(gate_type="switch", expert_act_fn="prelu", layer_lora_alpha=[4.0, 2.0, 1.0], activation_position="child"),
    dict(gate_type="noisy_topk", activation_position="child_v2", layer_top_k=[2, 2, 2], layer_num_experts=[2, 3, 2]),
    dict(gate_type="switch", shared_expert_pool=True, layer_num_experts=[2, 2, 2], layer_ranks=[2, 2, 2],
         layer_lora_alpha=[3.0]),
], ids=["switch-linear", "dense-linear-nodown", "noisy-prelu", "switch-alpha-child", "noisy-3x2", "shared-3layer"])
def test_three_layers_activations_and_scaling_match_reference(kwargs):
    kwargs = {**dict(layer_num_experts=[3, 2, 2], layer_top_k=[2, 1, 2], layer_ranks=[2, 1, 2], gate_dims=[4],
                     router_down_dim=6, aux_loss_coef=0.5), **kwargs}
    layer, config = make_layer(**kwargs)
    run_and_compare(layer, config)


@pytest.mark.parametrize("gate", GATES)
def test_eval_forward_matches_reference_without_noise_or_aux(gate):
    layer, config = make_layer(gate_type=gate, **SHAPES[False])
    x, mask = batch_with_padding()
    layer.eval()
    with torch.no_grad(), loss_window.collect(token_mask=mask) as window:
        out = layer(x) - layer.base_layer(x)
        expected, _ = reference(layer, config, x, mask, training=False)
    torch.testing.assert_close(out.reshape(-1, OUT), expected, atol=1e-5, rtol=1e-5)
    assert not window.terms


@pytest.mark.parametrize("gate", ("switch", "noisy_topk"))
def test_aux_terms_ignore_padding(gate):
    layer, _ = make_layer(gate_type=gate, **SHAPES[False])
    x, mask = batch_with_padding()
    layer.train()
    terms = []
    for garbage in (0.0, 100.0):
        x_pad = x.clone()
        x_pad[mask == 0] = garbage
        torch.manual_seed(0)
        with loss_window.collect(token_mask=mask) as window:
            layer(x_pad)
        terms.append(window.detached_terms())
    assert terms[0].keys() == terms[1].keys() and terms[0]
    for key in terms[0]:
        assert abs(terms[0][key] - terms[1][key]) < 1e-6, key


@pytest.mark.parametrize("init", ["w_final_zero", "eq_1_layer", "b_zero", "bw_zero"])
@pytest.mark.parametrize("sigma", ["tanh", "relu", "prelu"])
def test_zero_update_at_init(init, sigma):
    layer, _ = make_layer(perturb=False, init_method=init, expert_act_fn=sigma)
    x, _ = batch_with_padding()
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)


def test_normal_init_and_init_weights_false_are_not_the_identity():
    for kwargs in (dict(init_method="normal"), dict(init_method="w_final_zero", init_weights=False)):
        layer, _ = make_layer(perturb=False, **kwargs)
        x, _ = batch_with_padding()
        assert not torch.allclose(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("shared, shapes", [(False, dict(layer_num_experts=[3, 2, 2], layer_top_k=[2, 1, 2],
                                                         layer_ranks=[2, 3, 1])),
                                            (True, dict(layer_num_experts=[3, 3], layer_top_k=[2, 2],
                                                        layer_ranks=[2, 2]))])
def test_eq_1_layer_equals_flat_one_layer_moe(gate, shared, shapes):
    """Prop. 3.2: with identity sigma, x_L puts every tree node's A-projection, weighted by the product of the gate
    scores on its path, into its expert's fixed slot; the adapter is a flat 1-layer MoE whose up-projections are the
    column blocks of W_proj (which is 0 at init, so we set it)."""
    layer, config = make_layer(perturb=False, init_method="eq_1_layer", expert_act_fn="identity", gate_type=gate,
                               shared_expert_pool=shared, **shapes)
    E = layer.smore_experts["default"]
    with torch.no_grad():
        E["W_proj"].normal_()
        for name in E:
            if "A_bias" in name:
                E[name].normal_()
    x, _ = batch_with_padding()
    xs = x.reshape(-1, IN)
    layer.eval()
    with torch.no_grad():
        delta = (layer(x) - layer.base_layer(x)).reshape(-1, OUT)
        selected, scores = layer._route(config, layer._plans["default"], layer.smore_router["default"], xs, None)
    d, L = config.hidden_dims, config.num_layers
    flat = torch.zeros(xs.shape[0], d[-1])
    path_weight = torch.ones(xs.shape[0], 1)
    for level in reversed(range(L)):  # product of the scores from the root down to each node
        path_weight = path_weight.repeat_interleave(config.fan_out[level], dim=1) * scores[level]
        pool, r = (0 if shared else level), config.layer_ranks[level]
        offset = d[-1] - d[level + 1]  # layer l's slots sit below those of the layers above it
        for n in range(xs.shape[0]):
            for node, e in enumerate(selected[level][n].tolist()):
                code = E[f"A_{pool}"][e] @ xs[n] + E[f"A_bias_{pool}"][e]
                flat[n, offset + e * r: offset + (e + 1) * r] += path_weight[n, node] * code
    torch.testing.assert_close(delta, flat @ E["W_proj"].T.detach(), atol=1e-5, rtol=1e-5)


def test_eq_1_layer_single_layer_is_mixlora():
    layer, config = make_layer(perturb=False, init_method="eq_1_layer", expert_act_fn="identity",
                               layer_num_experts=[4], layer_top_k=[2], layer_ranks=[3])
    E = layer.smore_experts["default"]
    with torch.no_grad():
        E["W_proj"].normal_()
    x, _ = batch_with_padding()
    xs = x.reshape(-1, IN)
    with torch.no_grad():
        delta = (layer(x) - layer.base_layer(x)).reshape(-1, OUT)
        selected, scores = layer._route(config, layer._plans["default"], layer.smore_router["default"], xs, None)
        expected = torch.zeros_like(delta)
        for n in range(xs.shape[0]):
            for e, a in zip(selected[0][n].tolist(), scores[0][n]):
                expected[n] += a * (E["W_proj"][:, e * 3:(e + 1) * 3] @ (E["A_0"][e] @ xs[n]))
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-5)


BAD = [
    (dict(layer_top_k=[2]), "layer_top_k", "`layer_num_experts` has 2"),
    (dict(layer_ranks=[8, 8, 8]), "layer_ranks", "`layer_num_experts` has 2"),
    (dict(gate_dims=[8, 8, 8]), "gate_dims", "`layer_num_experts` has 2"),
    (dict(layer_lora_alpha=[1.0, 2.0, 3.0]), "layer_lora_alpha", "`layer_num_experts`"),
    (dict(layer_top_k=[2, 5]), "layer_top_k", "more than `layer_num_experts`"),
    (dict(layer_num_experts=[]), "layer_num_experts", "non-empty list"),
    (dict(layer_ranks=[8, 0]), "layer_ranks", "must be >= 1"),
    (dict(layer_num_experts=4), "layer_num_experts", "list"),
    (dict(gate_type="topk"), "gate_type", "'switch', 'noisy_topk', 'dense'"),
    (dict(gate_arch="bottom_up"), "gate_arch", "'mlp', 'linear'"),
    (dict(gate_type="noisy_topk", gate_arch="linear"), "gate_arch", "must be 'mlp'"),
    (dict(expert_act_fn="gelu"), "expert_act_fn", "'prelu|<initial slope>'"),
    (dict(gate_act_fn="prelu|x"), "gate_act_fn", "not a number"),
    (dict(activation_position="parent"), "activation_position", "'child_v2'"),
    (dict(init_method="zeros"), "init_method", "'eq_1_layer'"),
    (dict(shared_expert_pool=True, layer_num_experts=[4, 2]), "layer_num_experts", "shared_expert_pool"),
    (dict(shared_expert_pool=True, layer_ranks=[8, 4]), "layer_ranks", "shared_expert_pool"),
    (dict(router_down_dim=0), "router_down_dim", "must be >= 1"),
    (dict(layer_lora_alpha=[-1.0]), "layer_lora_alpha", "must be >"),
]


@pytest.mark.parametrize("kwargs, field, words", BAD, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD)])
def test_invalid_config(kwargs, field, words):
    with pytest.raises(MoeConfigError) as info:
        SMoREConfig(target_modules=["proj"], **kwargs)
    assert info.value.field == field
    assert f"`{field}`" in str(info.value) and words in str(info.value), str(info.value)


def test_llamafactory_keys_map_and_mismatch_names_both_yaml_keys():
    from llamafactory.hparams import get_train_args

    base = dict(model_name_or_path="/nonexistent/model", stage="sft", do_train=True, finetuning_type="smore",
                dataset="tiny", template="llama3", output_dir="/tmp/smore_lf_args", report_to="none",
                moe_layer_num_experts=[4, 4], moe_layer_top_k=[2, 2], moe_layer_ranks=[8, 8],
                moe_gate_type="noisy_topk")
    _, _, _, finetuning_args, _ = get_train_args(base)
    config = finetuning_args.moe_peft_config
    assert isinstance(config, SMoREConfig) and config.gate_type == "noisy_topk" and config.hidden_dims == [0, 32, 64]
    with pytest.raises(MoeConfigError) as info:
        get_train_args({**base, "moe_layer_top_k": [2]})
    assert "`moe_layer_top_k`" in str(info.value) and "`moe_layer_num_experts`" in str(info.value), str(info.value)


def tiny_qwen2():
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    return Qwen2ForCausalLM(config)


TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_batched_generate_with_kv_cache(gate, build):
    model = get_peft_model(build(), SMoREConfig(target_modules=TARGETS, gate_type=gate, init_weights=False))
    model.eval()
    ids = torch.randint(3, 128, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, use_cache=True, **kwargs)
        uncached = model.generate(input_ids=ids, use_cache=False, **kwargs)
    assert cached.shape == (2, 9)
    assert torch.equal(cached, uncached)


def test_bf16_forward_and_backward_are_finite():
    for gate in GATES:
        model = get_peft_model(tiny_llama(torch.bfloat16), SMoREConfig(target_modules=TARGETS, gate_type=gate,
                                                                        init_weights=False))
        model.train()
        ids = torch.randint(0, 128, (2, 6))
        with loss_window.collect(token_mask=torch.ones_like(ids)) as window:
            loss = model(input_ids=ids, labels=ids).loss
        total = loss + (window.weighted_total() if window.terms else 0)
        total.backward()
        assert torch.isfinite(total.float())
        assert all(torch.isfinite(p.grad.float()).all() for p in model.parameters() if p.grad is not None)


def test_disable_adapter_equals_base_model():
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        base = tiny_llama()(ids).logits
        model = get_peft_model(tiny_llama(), SMoREConfig(target_modules=TARGETS, init_weights=False))
        assert not torch.equal(model(ids).logits, base)
        with model.disable_adapter():
            assert torch.equal(model(ids).logits, base)


def test_save_and_load_in_fresh_process_is_bit_exact(tmp_path):
    config = SMoREConfig(target_modules=TARGETS, gate_type="noisy_topk", expert_act_fn="prelu|0.2",
                         gate_act_fn="prelu", shared_expert_pool=True, layer_lora_alpha=[16.0], init_weights=False)
    model = get_peft_model(tiny_llama(), config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SMORE" and saved["layer_num_experts"] == [4, 4]
    assert_reloads_bit_exact_in_fresh_process(tmp_path, ids, logits)


def count_ops(num_experts: int, gate: str, shared: bool) -> int:
    return count_train_ops(SMoREConfig(target_modules=["0"], gate_type=gate, layer_num_experts=[num_experts] * 2,
                                       layer_top_k=[2, 2], layer_ranks=[2, 2], shared_expert_pool=shared,
                                       init_weights=False), batch=(2, 4))


@pytest.mark.parametrize("gate, shared", [(g, False) for g in GATES] + [("switch", True)])
def test_op_count_does_not_depend_on_num_experts(gate, shared):
    assert count_ops(4, gate, shared) == count_ops(16, gate, shared)
