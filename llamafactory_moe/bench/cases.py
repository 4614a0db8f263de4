"""What the benchmark runs: the benchmark configuration of each method, the LoRA baselines and the targets.

Every method is compared with stock peft LoRA on the same targets at a matched budget, measured in the same process:

* **rank-matched** LoRA has rank = the method's total rank (``BenchCase.total_rank``: e.g. ``num_experts * expert_rank``
  for one-to-one experts), the budget the papers compare at;
* **param-matched** LoRA has the rank whose trainable-parameter count is closest to the method's (routers, mixers and
  gates included), computed from the built model.

Pass / miss is judged against the rank-matched baseline; the param-matched ratios are reported beside it.
A method that is implemented but missing from ``BENCH_CASES`` is listed in the report as "no bench config".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

# The shared budget: 4 experts of rank 8 (total rank 32), 2 active per token, no dropout (timings only).
BUDGET_TOTAL_RANK = 32


@dataclass(frozen=True)
class Targets:
    """Ratios to stock LoRA (same run, same targets) that each case must meet."""

    train_step: float = 1.15  # end-to-end training step time, <=
    layer_fwd_bwd: float = 1.30  # one d x d linear, forward + backward time, <=
    ops_vs_lora: float = 2.0  # aten ops per layer forward + backward at E=16, <= (and E=16 == E=4)
    peak_memory: float = 1.20  # peak memory of a training step, <=
    generate: float = 0.80  # generate() tokens/s with KV cache, >=


@dataclass(frozen=True)
class BenchCase:
    """One benchmark row: a method with fixed config kwargs (besides ``target_modules``)."""

    label: str
    method: str
    kwargs: dict[str, Any]
    total_rank: int  # the rank-matched LoRA baseline's rank
    # The config fields that set the number of experts (the op-count check sets them all to 4, then 16); () = the
    # method has no expert axis (its op count is taken once).
    experts_fields: tuple[str, ...] = ("num_experts",)
    # The fields holding experts-per-token, clipped to stay sparse when the op-count check changes E.
    top_k_fields: tuple[str, ...] = ("top_k",)
    targets: Targets = field(default_factory=Targets)
    note: str = ""

    def config_kwargs(self, num_experts: Optional[int] = None) -> dict[str, Any]:
        """The kwargs, optionally with every ``experts_fields`` set to ``num_experts`` (per layer for list fields) and
        the ``top_k_fields`` clipped to ``num_experts // 2``, so routing stays sparse at both sizes (top_k == E may take
        a dense path)."""
        kwargs = dict(self.kwargs)
        if num_experts is None:
            return kwargs
        top = max(1, num_experts // 2)
        for name in self.experts_fields:
            kwargs[name] = [num_experts] * len(kwargs[name]) if isinstance(kwargs[name], list) else num_experts
        for name in self.top_k_fields:
            value = kwargs.get(name)
            if isinstance(value, list):
                kwargs[name] = [min(v, top) for v in value]
            elif value is not None:
                kwargs[name] = min(value, top)
        return kwargs


_SHARED = dict(num_experts=4, top_k=2, expert_rank=8, expert_dropout=0.0)

# method -> its benchmark rows. Every row keeps the budget above unless its note says otherwise.
BENCH_CASES: dict[str, list[BenchCase]] = {
    "moelora": [BenchCase("moelora", "moelora", dict(_SHARED), total_rank=32)],
    # Every rank of one rank-32 LoRA is an expert; 8 active per token. The expert axis is the rank itself.
    "smora": [BenchCase("smora", "smora", dict(expert_rank=32, top_k=8, expert_dropout=0.0), total_rank=32,
                        experts_fields=("expert_rank",), note="32 rank-1 experts, top-8, loss-free balancing")],
    # S'MoRE keeps the root state d_L = sum_l s_l r_l = 32. Its 2-layer tree has its own training-step target.
    "smore": [
        BenchCase("smore-1layer", "smore", dict(layer_num_experts=[4], layer_top_k=[2], layer_ranks=[8],
                                                expert_dropout=0.0), total_rank=32,
                  experts_fields=("layer_num_experts",), top_k_fields=("layer_top_k",),
                  note="1 layer: 4 experts of rank 8, fan-out 2, switch gate"),
        BenchCase("smore-2layer", "smore", dict(layer_num_experts=[4, 4], layer_top_k=[2, 2], layer_ranks=[4, 4],
                                                expert_dropout=0.0), total_rank=32,
                  experts_fields=("layer_num_experts",), top_k_fields=("layer_top_k",),
                  targets=Targets(train_step=1.35),
                  note="2 layers: 4 + 4 experts of rank 4, fan-out 2 each, switch gates"),
    ],
    "goat": [BenchCase("goat", "goat", dict(_SHARED), total_rank=32,
                       note="SVD-segment init; W_res applied as a forward correction")],
    "adamole": [BenchCase("adamole", "adamole", dict(_SHARED, top_k=None), total_rank=32,
                          note="threshold routing (top_k unused)")],
    # M = 4 down-experts mixed into one rank-8 code, N = 4 up-experts: 32 stacked rows of A and columns of B.
    "d2mora": [BenchCase("d2mora", "d2mora", dict(_SHARED, top_k=None, num_down_experts=4), total_rank=32,
                         experts_fields=("num_experts", "num_down_experts"),
                         note="M = N = 4 experts of rank 8, dense routers")],
    # One shared rank-8 A, 4 routed B heads: B is rank 32 stacked, A only rank 8 (so fewer parameters than LoRA-32).
    "hydralora": [BenchCase("hydralora", "hydralora", dict(_SHARED, top_k=None), total_rank=32,
                            note="shared A of rank 8, 4 heads, dense router")],
    "moslora": [BenchCase("moslora", "moslora", dict(expert_rank=32, expert_dropout=0.0), total_rank=32,
                          experts_fields=(), note="rank 32 with a 32 x 32 mixer, no experts")],
}


def selected_cases(requested: Optional[Sequence[str]]) -> tuple[list[str], list[BenchCase], list[str]]:
    """What every benchmark mode runs for ``--methods``: the methods (default: every registered one), their cases, and
    the methods that have no benchmark config."""
    from ..core.peft_types import METHODS, register_all_methods

    register_all_methods()
    methods = list(requested) if requested else list(METHODS)
    cases, missing = cases_for(methods)
    return methods, cases, missing


def cases_for(methods: list[str]) -> tuple[list[BenchCase], list[str]]:
    """The cases of the given (implemented) methods, and the methods that have no benchmark config."""
    cases: list[BenchCase] = []
    missing: list[str] = []
    for method in methods:
        if method in BENCH_CASES:
            cases.extend(BENCH_CASES[method])
        else:
            missing.append(method)
    return cases, missing
