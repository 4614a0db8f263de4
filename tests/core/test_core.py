"""core/: routers and balance losses on hand-sized cases, kernel parity with the per-expert loops, PeftType
registration, the aux-loss window, step hooks, and the layering rule (core imports no method or integration)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from llamafactory_moe.core import loss_window, experts, routing
from llamafactory_moe.core.peft_types import extend_peft_type

CORE_DIR = Path(__file__).resolve().parents[2] / "llamafactory_moe" / "core"
# Every method file (discovered like `llamafactory_moe.methods` does: `_helper.py` files are not methods).
METHOD_FILES = sorted(p.stem for p in (CORE_DIR.parent / "methods").glob("*.py") if not p.stem.startswith("_"))


def test_softmax_top_k_keeps_k_and_renormalises():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    weights, probs, selected = routing.softmax_top_k(logits, top_k=2)
    assert selected.sum(-1).tolist() == [2, 2]
    assert selected[0].tolist() == [True, True, False, False]
    # ties broken by index order: deterministic
    assert selected[1].tolist() == [True, True, False, False]
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    e = torch.exp(torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(weights[0, :2], e / e.sum())
    torch.testing.assert_close(probs, torch.softmax(logits, -1))


def test_softmax_top_k_is_fp32_and_soft_when_k_is_none():
    logits = torch.randn(5, 3, dtype=torch.bfloat16)
    weights, probs, selected = routing.softmax_top_k(logits, top_k=None)
    assert weights.dtype == torch.float32 and selected is None  # None: every expert takes every token
    torch.testing.assert_close(weights, torch.softmax(logits.float(), -1))


@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_top_k_values_and_gradients_match_a_per_token_reference(renormalize):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 5, generator=g, requires_grad=True)
    upstream = torch.randn(9, 5, generator=g)
    weights, _, _ = routing.softmax_top_k(logits, top_k=2, renormalize=renormalize)
    (weights * upstream).sum().backward()
    reference_logits = logits.detach().clone().requires_grad_(True)
    rows = []
    for t in range(9):  # keep the 2 largest logits of the token, in order, and (re)normalise them
        probs = torch.softmax(reference_logits[t], -1)
        kept = sorted(range(5), key=lambda e: -float(logits.detach()[t, e]))[:2]
        row = [torch.zeros(()) for _ in range(5)]
        total = probs[kept].sum() if renormalize else 1.0
        for e in kept:
            row[e] = probs[e] / total
        rows.append(torch.stack(row))
    (torch.stack(rows) * upstream).sum().backward()
    torch.testing.assert_close(weights, torch.stack(rows).detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits.grad, reference_logits.grad, atol=1e-6, rtol=1e-5)
    # Inference skips the statistics, not the weights.
    plain, probs, selected = routing.softmax_top_k(logits.detach(), top_k=2, renormalize=renormalize, statistics=False)
    assert probs is None and selected is None
    torch.testing.assert_close(plain, weights.detach())


def test_switch_balance_loss_hand_case_and_padding():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.1, 0.9]])
    selected = torch.tensor([[True, False], [True, False], [False, True]])
    # all tokens: f = (2/3, 1/3), P = (1.4/3, 1.6/3); loss = 2 * (f . P)
    expected = 2 * ((2 / 3) * (1.4 / 3) + (1 / 3) * (1.6 / 3))
    assert math.isclose(float(routing.switch_balance_loss(probs, selected)), expected, rel_tol=1e-6)
    token_weights = torch.tensor([0.5, 0.5, 0.0])  # third token is padding: mean over the two real tokens
    expected_masked = 2 * (1.0 * 0.65 + 0.0 * 0.35)
    assert math.isclose(float(routing.switch_balance_loss(probs, selected, token_weights)), expected_masked,
                        rel_tol=1e-6)


def test_cv_squared_uses_unbiased_variance():
    v = torch.tensor([1.0, 2.0, 3.0])
    assert math.isclose(float(routing.cv_squared(v)), 1.0 / 4.0, rel_tol=1e-6)
    assert float(routing.cv_squared(torch.tensor([5.0]))) == 0.0


@pytest.mark.parametrize("num_experts, rank", [(1, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_match_per_expert_loops(num_experts, rank, dtype):
    g = torch.Generator().manual_seed(num_experts)
    n, d_in, d_out = 7, 5, 6
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    A = torch.randn(num_experts * rank, d_in, generator=g, dtype=dtype)
    B = torch.randn(d_out, num_experts * rank, generator=g, dtype=dtype)
    w = torch.softmax(torch.randn(n, num_experts, generator=g), -1)
    w[0] = 0.0  # a token routed nowhere
    w[:, 0] = 0.0 if num_experts > 1 else w[:, 0]  # an expert nobody uses
    torch.testing.assert_close(experts.paired_experts(x, A, B, w, rank),
                               experts.paired_experts_reference(x, A, B, w, rank))
    torch.testing.assert_close(experts.mixed_down_projection(x, A, w, rank),
                               experts.mixed_down_projection_reference(x, A, w, rank))
    h = torch.randn(n, rank, generator=g, dtype=dtype)
    torch.testing.assert_close(experts.routed_up_projection(h, B, w), experts.routed_up_projection_reference(h, B, w))
    # The scale on the gates and the residual inside the last GEMM: residual + s * (the same sums).
    residual = torch.randn(n, d_out, generator=g, dtype=dtype)
    torch.testing.assert_close(experts.paired_experts(x, A, B, w, rank, scaling=2.5, residual=residual),
                               residual + 2.5 * experts.paired_experts_reference(x, A, B, w, rank))
    torch.testing.assert_close(experts.routed_up_projection(h, B, w, scaling=0.5, residual=residual),
                               residual + 0.5 * experts.routed_up_projection_reference(h, B, w))


def test_peft_type_extension_is_idempotent_and_behaves_like_a_member():
    from peft.utils.peft_types import PeftType

    member = extend_peft_type("zzz_probe_method")
    assert extend_peft_type("zzz_probe_method") is member
    assert PeftType("ZZZ_PROBE_METHOD") is member and member in list(PeftType) and member == "ZZZ_PROBE_METHOD"
    assert {member: 1}["ZZZ_PROBE_METHOD"] == 1


def test_aux_loss_window_records_only_while_open_and_rejects_nesting():
    value = torch.tensor(2.0, requires_grad=True)
    loss_window.record_term("x", value, 1.0)  # closed: ignored
    mask = torch.tensor([[1, 1, 0]])
    with loss_window.collect(token_mask=mask) as window:
        loss_window.record_term("balance_loss", value, 0.5)
        loss_window.record_term("balance_loss", value, 0.5)
        assert loss_window.batch_token_mask(3).tolist() == [True, True, False]
        assert loss_window.batch_token_mask(4) is None  # does not describe these tokens
        with pytest.raises(RuntimeError):
            with loss_window.collect():
                pass
    assert window.detached_terms() == {"balance_loss": 2.0}
    window.weighted_total().backward()
    assert float(value.grad) == 1.0
    assert loss_window.current() is None


@pytest.mark.parametrize("prefix, names, buffers, field, words", [
    ("other_", ("probe_A",), (), "ProbeModel.prefix", "must be `probe_` (the method name + '_')"),
    ("probe_", ("probe_A", "lora_B"), (), "ProbeLayer.adapter_layer_names", "('lora_B') must start with `probe_`"),
    ("probe_", ("probe_A",), ("A_init",), "ProbeLayer.buffer_names", "('A_init') must start with `probe_`"),
], ids=["prefix", "adapter-layer-name", "buffer-name"])
def test_register_method_takes_the_name_from_the_config_and_checks_derived_names(prefix, names, buffers, field, words):
    from llamafactory_moe.core import METHODS, MoeConfigError, MoeLoraConfig, register_method

    config_cls = type("ProbeConfig", (MoeLoraConfig,), {"method_name": "probe"})
    layer_cls = type("ProbeLayer", (), {"adapter_layer_names": names, "buffer_names": buffers})
    model_cls = type("ProbeModel", (), {"prefix": prefix, "tuner_layer_cls": layer_cls})
    with pytest.raises(MoeConfigError) as info:
        register_method(config_cls, model_cls)
    message = str(info.value)
    assert message.startswith(f"`{field}`") and words in message and "\n" not in message, message
    assert "probe" not in METHODS
    bad_name = type("BadConfig", (MoeLoraConfig,), {"method_name": "Probe-1"})
    with pytest.raises(MoeConfigError, match="must be a lower-case Python identifier"):
        register_method(bad_name, model_cls)


def test_core_imports_no_method_or_integration():
    for path in CORE_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                assert "methods" not in module and "integrations" not in module, f"{path.name}: {module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert "llamafactory_moe.methods" not in alias.name, path.name
                    assert "llamafactory_moe.integrations" not in alias.name, path.name


def _imported_names(path) -> set[str]:
    """Every module and name a file imports (``from ..core import loss_window`` gives ``..core`` and
    ``loss_window``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_loss_window_has_one_door():
    """Methods reach the loss window only through MoeLoraLayer's helpers, and the routing math is pure: neither the
    method files nor core/routing.py import the window (which the layer, the tuner and the code that opens windows
    do)."""
    method_files = sorted((CORE_DIR.parent / "methods").glob("*.py"))
    assert len(method_files) >= 9, method_files  # __init__ + 8 methods: the glob really found them
    for path in [*method_files, CORE_DIR / "routing.py"]:
        assert not any("loss_window" in name or "aux_loss" in name for name in _imported_names(path)), path.name
    routing_imports = _imported_names(CORE_DIR / "routing.py")
    assert not any(name.startswith(".") or name.startswith("llamafactory_moe") for name in routing_imports), \
        routing_imports
    # and the door is used: the layer imports it (the check above is not vacuous)
    assert "loss_window" in _imported_names(CORE_DIR / "layer.py")


@pytest.mark.parametrize("first_import", [
    "import peft",
    "import llamafactory_moe.core.layer",          # core pulls peft in while core itself is half-initialised
    f"import llamafactory_moe.methods.{METHOD_FILES[-1]}",  # a method file first
    "from llamafactory_moe import MoELoRAConfig",  # the lazy public classes
])
def test_methods_are_registered_whatever_is_imported_first(first_import):
    import subprocess
    import sys

    assert len(METHOD_FILES) >= 8, METHOD_FILES
    script = (f"{first_import}\nimport peft\nfrom peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as M\n"
              "print(sorted(k.value.lower() for k in M if k.value.lower() in "
              f"{tuple(METHOD_FILES)!r}))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert "llamafactory-moe: warning" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() == str(METHOD_FILES), proc.stdout


def test_sum_normalize_matches_division_and_its_autograd_gradient():
    g = torch.Generator().manual_seed(1)
    values = torch.rand(6, 4, generator=g, dtype=torch.float64)
    values[1] = 0.0  # a row summing to 0 stays 0, with a finite gradient
    values[2, :3] = 0.0
    upstream = torch.randn(6, 4, generator=g, dtype=torch.float64)
    ours = values.clone().requires_grad_(True)
    reference = values.clone().requires_grad_(True)
    out = routing.sum_normalize(ours)
    (out * upstream).sum().backward()
    rows = []
    for t in range(6):  # plain division per token; a zero sum divides by 1
        total = reference[t].sum()
        rows.append(reference[t] / (total if float(total.detach()) > 0 else 1.0))
    expected = torch.stack(rows)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(out, expected.detach())
    torch.testing.assert_close(ours.grad, reference.grad)
    assert torch.autograd.gradcheck(routing.sum_normalize, (values[[0, 3]].clone().requires_grad_(True),))


def test_gather_experts_matches_torch_gather_and_keeps_only_the_index():
    g = torch.Generator().manual_seed(2)
    outputs = torch.randn(5, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[0, 2], [3, 3], [1, 0], [2, 1], [0, 0]]).unsqueeze(-1).expand(5, 2, 3)
    upstream = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours = experts.gather_experts(outputs, index)
    assert all(t.dtype == torch.int64 for t in saved)  # the (N, E, d) outputs are not kept alive
    (grad_ours,) = torch.autograd.grad((ours * upstream).sum(), outputs)
    reference = torch.stack([torch.stack([outputs[n, int(index[n, j, 0])] for j in range(2)]) for n in range(5)])
    (grad_reference,) = torch.autograd.grad((reference * upstream).sum(), outputs)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(grad_ours, grad_reference)  # repeated picks (token 1, token 4) accumulate


def test_a_target_that_is_not_linear_is_a_one_line_config_error():
    """Known only while the model is built (which module `target_modules` matches): still the config error, naming the
    key, the matched module and what is allowed."""
    from peft import get_peft_model

    from llamafactory_moe import MoELoRAConfig
    from llamafactory_moe.core.errors import MoeConfigError
    from tests.methods.common import tiny_llama

    config = MoELoRAConfig(target_modules=["embed_tokens"], num_experts=2, top_k=1, expert_rank=2)
    with pytest.raises(MoeConfigError) as info:
        get_peft_model(tiny_llama(), config)
    assert str(info.value).startswith("`target_modules` ('model.embed_tokens') matched a Embedding"), str(info.value)
    assert "nn.Linear layers only" in str(info.value)
