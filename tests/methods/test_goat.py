"""GOAT (llamafactory_moe/methods/goat.py) against the paper's equations written as per-token loops."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from peft import get_peft_model

import llamafactory_moe  # noqa: F401  (registers the methods)
from llamafactory_moe.core import MoeConfigError, loss_window
from llamafactory_moe.methods.goat import GoatConfig, GoatLayer, svd_segments
from tests.methods.common import assert_reloads_bit_exact_in_fresh_process, count_train_ops, tiny_llama

# Loading a GOAT checkpoint must take the saved segments, never recompute them.
FORBID_SVD = """
def no_svd(*args, **kwargs):
    raise AssertionError("loading a GOAT adapter must not run an SVD")
torch.linalg.svd = no_svd
"""

IN, OUT = 24, 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.proj(x)


def make_layer(seed=0, **kwargs) -> tuple[nn.Module, GoatLayer]:
    torch.manual_seed(seed)
    model = get_peft_model(Tiny(), GoatConfig(target_modules=["proj"], **kwargs))
    return model, model.base_model.model.proj


def batch_with_padding(seed=1):
    torch.manual_seed(seed)
    x = torch.randn(3, 5, IN)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return x, mask


def reference(layer: GoatLayer, config: GoatConfig, x: torch.Tensor, mask: torch.Tensor):
    """The paper's GOAT layer token by token, expert by expert."""
    E, r = config.num_experts, config.expert_rank
    k = config.top_k or E
    s = (math.sqrt(3 * config.scaling_eta * IN / r) if config.scaling_mode == "gradient_alignment"
         else config.alpha / r)
    c = 1 / E if config.residual_coef is None else config.residual_coef
    base = layer.base_layer
    A, B = layer.goat_A["default"], layer.goat_B["default"]
    A0, B0 = layer.goat_A_init["default"], layer.goat_B_init["default"]
    router = layer.goat_router["default"]
    tokens = x.reshape(-1, IN)
    outputs, probs, chosen = [], [], []
    for x_n in tokens:
        w_res_x = base.weight @ x_n + base.bias
        for e in range(E):  # W_res = W0 - c * s * sum_e B0_e A0_e
            w_res_x = w_res_x - c * s * B0[:, e * r:(e + 1) * r] @ (A0[e * r:(e + 1) * r] @ x_n)
        p = torch.softmax(router @ x_n, dim=-1)
        top = torch.topk(p, k).indices.tolist()
        y = w_res_x
        for e in top:
            w_e = p[e] / sum(p[j] for j in top)
            y = y + w_e * s * B[:, e * r:(e + 1) * r] @ (A[e * r:(e + 1) * r] @ x_n)
        outputs.append(y)
        probs.append(p)
        chosen.append(torch.tensor([float(e in top) for e in range(E)]))
    real = mask.reshape(-1).bool()
    f = torch.stack(chosen)[real].mean(0)
    P = torch.stack(probs)[real].mean(0)
    balance = E * (f * P).sum()
    return torch.stack(outputs).reshape(*x.shape[:-1], OUT), balance


CASES = [
    dict(num_experts=4, top_k=2, expert_rank=2, lora_alpha=8),
    dict(num_experts=4, top_k=None, expert_rank=1, lora_alpha=4),
    dict(num_experts=3, top_k=1, expert_rank=2, scaling_mode="gradient_alignment", scaling_eta=0.5),
    dict(num_experts=4, top_k=2, expert_rank=2, svd_init=False, residual_coef=0.3),
    dict(num_experts=5, top_k=3, expert_rank=1, svd_shrink=2.0, residual_coef=0.0),
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))

def test_output_gradients_and_aux_match_reference(kwargs):
    model, layer = make_layer(init_weights=False, **kwargs)
    config = model.peft_config["default"]
    with torch.no_grad():  # random correction buffers too, so every term is exercised
        layer.goat_A_init["default"].normal_()
        layer.goat_B_init["default"].normal_()
    x, mask = batch_with_padding()
    x.requires_grad_(True)
    cotangent = torch.randn(3, 5, OUT)
    params = [x, layer.goat_A["default"], layer.goat_B["default"], layer.goat_router["default"]]

    layer.train()
    with loss_window.collect(token_mask=mask) as window:
        out = layer(x)
    terms = window.terms.get("balance_loss", [])
    ref_out, ref_balance = reference(layer, config, x, mask)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)

    if config.top_k is None:
        assert terms == []  # all experts active: the Switch loss is a constant and is skipped
        loss, ref_loss = (out * cotangent).sum(), (ref_out * cotangent).sum()
    else:
        (coef, balance), = terms
        assert coef == 1e-3
        torch.testing.assert_close(balance, ref_balance, atol=1e-5, rtol=1e-5)
        loss = (out * cotangent).sum() + 10 * balance
        ref_loss = (ref_out * cotangent).sum() + 10 * ref_balance
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref_loss, params)
    for name, g, rg in zip(["x", "A", "B", "router"], grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5, msg=lambda m: f"grad of {name}: {m}")


def test_svd_segments_are_the_top_triplets_of_each_block():
    torch.manual_seed(0)
    W = torch.randn(OUT, IN)
    E, r, divisor = 4, 2, 3.0
    A, B = svd_segments(W, E, r, divisor)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    block = min(IN, OUT) // E  # 5
    for e in range(E):
        idx = list(range(e * block, e * block + r))
        rows = slice(e * r, (e + 1) * r)
        expected = U[:, idx] @ torch.diag(S[idx] / divisor) @ Vh[idx]
        torch.testing.assert_close(B[:, rows] @ A[rows], expected, atol=1e-5, rtol=1e-5)
        # The square root is split evenly: A_e A_e^T = B_e^T B_e = diag(sigma / divisor).
        torch.testing.assert_close(A[rows] @ A[rows].T, torch.diag(S[idx] / divisor), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(B[:, rows].T @ B[:, rows], torch.diag(S[idx] / divisor), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scaling_mode", ["alpha", "gradient_alignment"])
def test_layer_init_uses_svd_segments_scale_and_shrink(scaling_mode):
    _, layer = make_layer(num_experts=4, expert_rank=2, lora_alpha=6, svd_shrink=7.0, scaling_mode=scaling_mode)
    s = 6 / 2 if scaling_mode == "alpha" else math.sqrt(3 * 1.0 * IN / 2)
    A_ref, B_ref = svd_segments(layer.base_layer.weight, 4, 2, s * 7.0)
    assert torch.equal(layer.goat_A["default"], A_ref) and torch.equal(layer.goat_B["default"], B_ref)
    assert torch.equal(layer.goat_A_init["default"], A_ref) and torch.equal(layer.goat_B_init["default"], B_ref)


def test_closed_form_gradient_alignment_scale():
    config = GoatConfig(expert_rank=4, scaling_mode="gradient_alignment", scaling_eta=2.0, lora_alpha=16)
    assert config.layer_scaling(4096) == pytest.approx(math.sqrt(3 * 2.0 * 4096 / 4))
    assert GoatConfig(expert_rank=4, lora_alpha=16).layer_scaling(4096) == 4.0


@pytest.mark.parametrize("scaling_mode", ["alpha", "gradient_alignment"])
def test_expected_output_under_uniform_routing_equals_base(scaling_mode):
    """Zero router -> uniform p; top_k = E -> w_e = 1/E = c, so W_res x + s/E sum_e B_e A_e x = W0 x."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        base = model(ids).logits
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, GoatConfig(target_modules=targets, num_experts=4, top_k=None, expert_rank=2,
                                                  lora_alpha=16, scaling_mode=scaling_mode))
    layers = [m for m in peft_model.modules() if isinstance(m, GoatLayer)]
    assert len(layers) == 14
    with torch.no_grad():
        for layer in layers:
            assert layer.goat_B["default"].abs().sum() > 0  # really SVD-initialised, not zero
            layer.goat_router["default"].zero_()
        torch.testing.assert_close(peft_model(ids).logits, base, atol=1e-5, rtol=1e-5)


def test_top_k_output_differs_from_base_per_token():
    # identity_at_init = False: with top-2 of 4 the output equals the base only in expectation.
    assert GoatConfig.identity_at_init is False and GoatConfig.modifies_base_weights is True
    model, layer = make_layer(num_experts=4, top_k=2, expert_rank=2)
    x = torch.randn(6, IN)
    with torch.no_grad():
        assert not torch.allclose(layer(x), layer.base_layer(x), atol=1e-6)


@pytest.mark.parametrize("kwargs, field", [
    (dict(svd_shrink=0.0), "svd_shrink"),
    (dict(svd_shrink=-1.0), "svd_shrink"),
    (dict(residual_coef=-0.1), "residual_coef"),
    (dict(scaling_mode="rs"), "scaling_mode"),
    (dict(scaling_eta=0.0), "scaling_eta"),
    (dict(svd_init="yes"), "svd_init"),
    (dict(top_k=9, num_experts=8), "top_k"),
    (dict(expert_rank=0), "expert_rank"),
])
def test_invalid_config(kwargs, field):
    with pytest.raises(MoeConfigError, match=f"`{field}`") as info:
        GoatConfig(**kwargs)
    assert info.value.field == field


def test_too_many_triplets_for_layer_is_refused():
    with pytest.raises(ValueError, match="num_experts \\* expert_rank <= 20"):
        make_layer(num_experts=8, expert_rank=3)


def test_bf16_forward_is_finite():
    model = tiny_llama(torch.bfloat16)
    peft_model = get_peft_model(model, GoatConfig(target_modules=["q_proj", "v_proj", "down_proj"], num_experts=4,
                                                  expert_rank=2, scaling_mode="gradient_alignment"))
    logits = peft_model(torch.randint(0, 128, (2, 6))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_disable_adapter_equals_base_model():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        base = model(ids).logits
        peft_model = get_peft_model(model, GoatConfig(target_modules=["q_proj", "up_proj"], num_experts=4,
                                                      expert_rank=2, init_weights=False))
        assert not torch.equal(peft_model(ids).logits, base)
        with peft_model.disable_adapter():
            assert torch.equal(peft_model(ids).logits, base)  # W0 is never edited


def test_save_and_load_in_fresh_process_is_bit_exact(tmp_path):
    model = tiny_llama()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, GoatConfig(target_modules=targets, num_experts=4, top_k=2, expert_rank=2,
                                                  scaling_mode="gradient_alignment"))
    with torch.no_grad():  # stand-in for training: move the experts and routers away from their init
        for name, param in peft_model.named_parameters():
            if "goat_" in name:
                param.add_(0.05 * torch.randn_like(param))
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        logits = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved_config["svd_init"] is False and saved_config["peft_type"] == "GOAT"
    assert peft_model.peft_config["default"].svd_init is True  # the live config is untouched
    assert_reloads_bit_exact_in_fresh_process(tmp_path, ids, logits, prelude=FORBID_SVD)


def count_ops(num_experts: int) -> int:
    return count_train_ops(GoatConfig(target_modules=["0"], num_experts=num_experts, top_k=2, expert_rank=2,
                                      init_weights=False))


def test_op_count_does_not_depend_on_num_experts():
    assert count_ops(4) == count_ops(16)


DIST_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    import llamafactory_moe
    from peft import get_peft_model
    from llamafactory_moe.methods.goat import GoatConfig

    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
    svd = torch.linalg.svd
    def only_rank0(*args, **kwargs):
        assert rank == 0, "only rank 0 computes the SVD"
        return svd(*args, **kwargs)
    torch.linalg.svd = only_rank0
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 20))
    model = get_peft_model(model, GoatConfig(target_modules=["0"], num_experts=4, expert_rank=2))
    layer = model.base_model.model[0]
    A0 = layer.goat_A_init["default"]
    gathered = [torch.empty_like(A0) for _ in range(2)]
    dist.all_gather(gathered, A0)
    assert torch.equal(gathered[0], gathered[1]) and gathered[0].abs().sum() > 0
    assert torch.equal(layer.goat_A["default"], A0)
    dist.destroy_process_group()
    print("OK", rank)
""")


def test_svd_runs_on_rank0_and_is_broadcast(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    init_file = str(tmp_path / "init")
    procs = [subprocess.Popen([sys.executable, "-c", DIST_SCRIPT, str(rank), init_file], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for rank in range(2)]
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        assert f"OK {rank}" in out


ZERO3_SCRIPT = textwrap.dedent("""
    import os, torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("TEST_PORT", "29731"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    import llamafactory_moe
    from peft import get_peft_model
    from llamafactory_moe.methods.goat import GoatConfig, svd_segments

    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    keep_alive = HfDeepSpeedConfig(ds_config)  # makes is_deepspeed_zero3_enabled() true, as LLaMA-Factory does
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = torch.nn.Sequential(torch.nn.Linear(48, 40))
    weight = model[0].weight
    assert weight.shape == (0,), weight.shape  # partitioned
    layer = get_peft_model(model, GoatConfig(target_modules=["0"], num_experts=4, expert_rank=2)).base_model.model[0]
    with deepspeed.zero.GatheredParameters(weight):
        A, B = svd_segments(weight, 4, 2, layer.moe_config["default"].layer_scaling(48) * 10.0)
    assert torch.equal(layer.goat_A_init["default"], A) and torch.equal(layer.goat_B_init["default"], B)
    assert torch.equal(layer.goat_A["default"], A) and weight.shape == (0,)  # W0 untouched, still partitioned
    print("ZERO3-OK", flush=True)
    torch.distributed.destroy_process_group()
    # No manual wait here: get_peft_model in a distributed process registered the gloo exit guard (core/gloo_exit.py),
    # without which this script aborted at exit in CI ("terminate called without an active exception").
    from llamafactory_moe.core import gloo_exit
    assert gloo_exit._registered
""")


@pytest.mark.slow
def test_svd_init_gathers_zero3_partitioned_weight(tmp_path):
    pytest.importorskip("deepspeed")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TEST_PORT": str(29700 + os.getpid() % 200)}
    result = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT], capture_output=True, text=True, env=env,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ZERO3-OK" in result.stdout
