"""Routing statistics (analysis.statistics) against per-token loops on hand-built routing decisions, and the
per-method expert-weight hook on every matrix row."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model

import llamafactory_moe  # noqa: F401
from llamafactory_moe.analysis import statistics as S
from llamafactory_moe.core import METHODS, MoeLoraLayer, loss_window
from llamafactory_moe.core.routing import softmax_top_k
from tests.method_cases import METHOD_CASES
from tests.methods.common import tiny_llama

LAYER = SimpleNamespace(moe_layer_name="layer")


def _record(batches) -> dict[str, torch.Tensor]:
    """Record each (routing_weights, selected, mask) batch through the training path and sum the summaries."""
    acc: dict[str, torch.Tensor] = {}
    for weights, selected, mask in batches:
        with loss_window.collect(token_mask=mask, collect_routing=True) as window:
            flat_mask = None if mask is None else loss_window.batch_token_mask(weights.shape[0])
            MoeLoraLayer.record_routing(LAYER, weights, selected, flat_mask)  # what every layer calls
        (summary,) = window.routing["layer"]
        S.accumulate(acc, summary)
    return acc


def _reference(batches, num_experts: int) -> dict[str, object]:
    """The definitions in analysis.statistics, written as loops over real tokens and experts."""
    counts, mass, entropies = [0.0] * num_experts, [0.0] * num_experts, []
    for weights, selected, mask in batches:
        for t in range(weights.shape[0]):
            if mask is not None and not bool(mask.reshape(-1)[t]):
                continue
            row = [float(w) for w in weights[t]]
            total = sum(row)
            entropies.append(-sum((w / total) * math.log(w / total) for w in row if w > 0))
            for e in range(num_experts):
                counts[e] += 1.0 if selected is None or bool(selected[t, e]) else 0.0
                mass[e] += row[e]
    tokens = len(entropies)
    dense = all(c == tokens for c in counts)
    basis = mass if dense else counts
    load = [v / sum(basis) for v in basis]
    mean = sum(load) / num_experts
    std = math.sqrt(sum((v - mean) ** 2 for v in load) / num_experts)
    return {
        "tokens": tokens, "load": load, "load_basis": "mass" if dense else "tokens", "load_cv": std / mean,
        "router_entropy": sum(entropies) / tokens / math.log(num_experts),
        "dropped_expert_frac": 1 - sum(counts) / (tokens * num_experts),
        "inactive_expert_frac": sum(1 for c in counts if c == 0) / num_experts,
    }


def _assert_matches(got: dict, expected: dict) -> None:
    assert got["tokens"] == expected["tokens"] and got["load_basis"] == expected["load_basis"]
    torch.testing.assert_close(torch.tensor(got["load"], dtype=torch.float64),
                               torch.tensor(expected["load"], dtype=torch.float64), atol=1e-5, rtol=0)
    for key in ("load_cv", "router_entropy", "dropped_expert_frac", "inactive_expert_frac"):
        assert got[key] == pytest.approx(expected[key], abs=1e-5), key


def test_top_k_statistics_match_loops_over_two_batches_with_padding():
    torch.manual_seed(0)
    batches = []
    for batch, seq in ((2, 5), (3, 4)):
        logits = torch.randn(batch * seq, 5) * 2
        logits[:, 4] = -30.0  # expert 4 is never in the top-2: an inactive expert
        weights, _, selected = softmax_top_k(logits, top_k=2)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, -2:] = 0
        batches.append((weights, selected, mask))
    got = S.layer_statistics(_record(batches))
    expected = _reference(batches, 5)
    _assert_matches(got, expected)
    assert got["tokens"] == 8 + 10
    assert got["inactive_expert_frac"] == pytest.approx(0.2) and got["dropped_expert_frac"] == pytest.approx(0.6)


def test_threshold_routing_varies_the_dropped_fraction():
    # AdaMoLE-like: token-dependent numbers of active experts, weights renormalised over the active ones.
    selected = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    weights = torch.rand(3, 4) * selected
    weights = weights / weights.sum(-1, keepdim=True)
    batches = [(weights, selected, None)]
    got = S.layer_statistics(_record(batches))
    _assert_matches(got, _reference(batches, 4))
    assert got["dropped_expert_frac"] == pytest.approx(1 - 6 / 12)
    assert got["inactive_expert_frac"] == pytest.approx(0.25)


def test_dense_router_load_is_the_gate_mass_not_a_constant():
    # Before: dense routers counted every expert for every token, so the load was uniform and its CV always 0.
    weights = torch.softmax(torch.tensor([[3.0, 0.0, 0.0], [2.0, 1.0, 0.0], [4.0, 0.0, 1.0], [1.0, 1.0, 1.0]]), dim=-1)
    mask = torch.tensor([[1, 1, 1, 0]])
    batches = [(weights, None, mask)]
    got = S.layer_statistics(_record(batches))
    _assert_matches(got, _reference(batches, 3))
    assert got["load_basis"] == "mass" and got["load_cv"] > 0.5
    assert got["dropped_expert_frac"] == 0.0 and got["inactive_expert_frac"] == 0.0
    # A top-k router with k == E is dense too.
    weights, _, selected = softmax_top_k(torch.randn(6, 3), top_k=3)
    assert S.layer_statistics(_record([(weights, selected, None)]))["load_basis"] == "mass"


def test_routing_metrics_average_layers():
    a = _record([(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[True, False], [True, False]]), None)])
    b = _record([(torch.tensor([[0.5, 0.5], [0.5, 0.5]]), None, None)])
    overall, per_layer = S.routing_metrics({"a": a, "b": b}, {"a": 0.5, "b": 1.0})
    assert per_layer["a"]["load_cv"] == pytest.approx(1.0) and per_layer["b"]["load_cv"] == pytest.approx(0.0)
    assert overall["moe_load_cv"] == pytest.approx(0.5)
    assert overall["moe_router_entropy"] == pytest.approx(0.5)  # 0 (one expert) and 1 (uniform over 2)
    assert overall["moe_inactive_expert_frac"] == pytest.approx(0.25)
    assert overall["moe_dropped_expert_frac"] == pytest.approx(0.25)
    assert overall["moe_expert_similarity"] == pytest.approx(0.75)


def test_expert_similarity_identical_orthogonal_and_loop_reference():
    v = torch.randn(1, 12)
    assert S.expert_similarity(v.repeat(3, 1)) == pytest.approx(1.0, abs=1e-6)
    assert S.expert_similarity(torch.cat([v, -v])) == pytest.approx(1.0, abs=1e-6)  # opposite = collapsed too
    assert S.expert_similarity(torch.eye(4, 12)) == pytest.approx(0.0, abs=1e-7)
    assert S.expert_similarity(v) is None
    vectors = torch.randn(5, 7)
    pairs = [abs(float(vectors[i] @ vectors[j] / (vectors[i].norm() * vectors[j].norm())))
             for i in range(5) for j in range(i + 1, 5)]
    assert S.expert_similarity(vectors) == pytest.approx(sum(pairs) / len(pairs), abs=1e-5)
    matrix = S.cosine_similarity_matrix(vectors)
    torch.testing.assert_close(matrix.diagonal(), torch.ones(5), atol=1e-6, rtol=0)


@pytest.mark.parametrize("case_id,method,kwargs", [(c[0], c[1], c[2]) for c in METHOD_CASES],
                         ids=[c[0] for c in METHOD_CASES])
def test_expert_weight_vectors_have_one_row_per_routed_expert(case_id, method, kwargs):
    torch.manual_seed(0)
    config_cls = METHODS[method].config_cls
    model = get_peft_model(tiny_llama(), config_cls(target_modules=["q_proj", "v_proj"], init_weights=False, **kwargs))
    model.train()
    ids = torch.randint(0, 128, (2, 5))
    with loss_window.collect(token_mask=torch.ones_like(ids), collect_routing=True) as window:
        model(ids)
    layers = [m for m in model.modules() if isinstance(m, MoeLoraLayer)]
    vectors = S.model_expert_vectors(model)
    if not window.routing:  # no router (MoSLoRA): no experts to compare either
        assert vectors == {}
        return
    assert set(vectors) == set(window.routing) == {m.moe_layer_name for m in layers}
    for name, records in window.routing.items():
        num_experts = records[0]["load"].shape[0]
        assert vectors[name].ndim == 2 and vectors[name].shape[0] == num_experts, name
        assert torch.isfinite(vectors[name]).all()
        # Experts of one layer are distinct parameters: random init gives low, not identical, similarity.
        similarity = S.expert_similarity(vectors[name])
        assert similarity is None or similarity < 0.99
