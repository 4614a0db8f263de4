"""The top-k selection of ``core.routing``: eager (argsort + scatter) and compiled (pairwise rank for E < 8) forms give
the mask of a straightforward stable descending sort written here (ties to the lower expert index, NaN above every
number), on random scores, on scores with many ties and on scores with NaN / +-inf, for several E and k."""

from __future__ import annotations

import math

import pytest
import torch

from llamafactory_moe.core import routing


def reference_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Each score's position in its row sorted descending by a stable sort (Python's ``sorted``), NaN first."""
    ranks = torch.empty(scores.shape, dtype=torch.int64)
    for n, row in enumerate(scores.tolist()):
        # Stable: equal keys keep their index order. NaN (key 0) precedes every number (key 1), then high values first.
        order = sorted(range(len(row)), key=lambda e: (0, 0.0) if math.isnan(row[e]) else (1, -row[e]))
        for position, e in enumerate(order):
            ranks[n, e] = position
    return ranks


def reference_keep_bias(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    return torch.where(reference_ranks(scores) < top_k, 0.0, float("-inf"))


def make_scores(kind: str, num_experts: int, num_tokens: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + num_experts)
    if kind == "random":
        return torch.randn(num_tokens, num_experts, generator=gen)
    # Few distinct values: most rows have several tied experts, some entirely tied.
    scores = torch.randint(0, 3, (num_tokens, num_experts), generator=gen).float()
    scores[0] = 1.0
    if kind == "special":
        special = torch.tensor([float("nan"), float("inf"), float("-inf")])
        pick = torch.randint(0, 6, scores.shape, generator=gen)  # 0-2: a special value, 3-5: keep the tied value
        scores = torch.where(pick < 3, special[pick.clamp_max(2)], scores)
    return scores


CASES = [(e, k) for e in (1, 2, 4, 7, 8, 9, 16, 32) for k in sorted({1, min(2, e), e // 2 or 1, e - 1 or 1, e})]


@pytest.mark.parametrize("kind", ["random", "ties", "special"])
def test_pairwise_rank_is_the_stable_descending_sort_position(kind):
    for num_experts in (1, 2, 4, 7, 8, 9, 16, 32, 64):
        scores = make_scores(kind, num_experts)
        assert torch.equal(routing.pairwise_rank(scores), reference_ranks(scores)), num_experts


@pytest.mark.parametrize("kind", ["random", "ties", "special"])
def test_eager_top_k_keep_bias_matches_the_reference(kind):
    for num_experts, top_k in CASES:
        scores = make_scores(kind, num_experts)
        assert torch.equal(routing.top_k_keep_bias(scores, top_k), reference_keep_bias(scores, top_k)), (
            num_experts, top_k)


@pytest.mark.parametrize("kind", ["random", "ties", "special"])
@pytest.mark.parametrize("num_experts,top_k", [(2, 1), (4, 2), (7, 3), (8, 3), (32, 8)])  # pairwise: E < 8
def test_compiled_top_k_keep_bias_matches_the_reference(kind, num_experts, top_k):
    torch._dynamo.reset()  # a fresh compile per case (the shapes and k differ)

    @torch.compile(backend="inductor", fullgraph=True, dynamic=False)
    def select(scores):
        return routing.top_k_keep_bias(scores, top_k)

    scores = make_scores(kind, num_experts)
    assert torch.equal(select(scores), reference_keep_bias(scores, top_k))


def test_compiled_softmax_top_k_selects_like_eager_on_ties():
    torch._dynamo.reset()
    logits = make_scores("ties", 4)
    eager = routing.softmax_top_k(logits, 2)
    compiled = torch.compile(lambda t: routing.softmax_top_k(t, 2), backend="inductor", fullgraph=True)(logits)
    assert torch.equal(compiled[2], eager[2])  # the same experts, bit for bit
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def reference_indices(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    return torch.argsort(reference_ranks(scores), dim=-1)[..., :top_k]  # the expert at position 0, 1, ..


@pytest.mark.parametrize("kind", ["random", "ties", "special"])
def test_top_k_indices_and_one_hot_match_the_reference(kind):
    for num_experts, top_k in CASES:
        scores = make_scores(kind, num_experts)
        want = reference_indices(scores, top_k)
        assert torch.equal(routing.top_k_indices(scores, top_k), want), (num_experts, top_k)
        one_hot = routing.top_k_one_hot(scores, top_k)  # the compiled path's building block, run eagerly
        assert torch.equal(one_hot.float().argmax(dim=-2), want)
        assert torch.equal(one_hot.sum(dim=-2), torch.ones_like(want, dtype=torch.int64))  # one expert per rank


@pytest.mark.parametrize("kind", ["random", "ties", "special"])
@pytest.mark.parametrize("num_experts,top_k", [(4, 2), (7, 3), (9, 3)])
def test_compiled_top_k_indices_match_the_reference(kind, num_experts, top_k):
    torch._dynamo.reset()
    select = torch.compile(lambda t: routing.top_k_indices(t, top_k), backend="inductor", fullgraph=True,
                           dynamic=False)
    scores = make_scores(kind, num_experts).view(8, 8, num_experts)  # (N, P, E) as S'MoRE's gates use it
    assert torch.equal(select(scores), reference_indices(scores.flatten(0, 1), top_k).view(8, 8, top_k))
