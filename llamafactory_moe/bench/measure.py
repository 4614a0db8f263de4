"""Measurement primitives: interleaved timing, aten-op counting with host-sync detection, peak training memory."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode


# -- timing ------------------------------------------------------------------------------------------------------------
class Timer:
    """Wall time of ``fn()``: ``perf_counter`` on CPU, CUDA events (plus a synchronise) on GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def interleaved_times(fns: dict[str, Callable[[], object]], timer: Timer, warmup: int, reps: int
                      ) -> dict[str, list[float]]:
    """Run every ``fn`` ``warmup`` times, then ``reps`` rounds of one call each, the order rotating every round.

    Interleaving spreads the machine's background load over all variants instead of penalising whichever variant
    happened to run during a busy spell; rotating the order removes any first/last-in-round bias.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timer(fns[name]))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


Spread = tuple[float, float, float]  # (median, min, max) over rounds


def round_ratios(values: list[float], baseline: list[float]) -> Optional[Spread]:
    """Per-round ``value / baseline`` as (median, min, max); None without a round on both sides."""
    if not values or not baseline or len(values) != len(baseline):
        return None
    ratios = [v / b for v, b in zip(values, baseline)]
    return statistics.median(ratios), min(ratios), max(ratios)


def spread_verdict(stats: Optional[Spread], target: float, at_least: bool = False) -> str:
    """pass if the whole spread meets the target (<= it, or >= it with ``at_least``), MISS if all of it misses,
    otherwise within noise (the target lies inside the run-to-run spread)."""
    if stats is None:
        return "n/a"
    _, low, high = stats
    meets_all, misses_all = (low >= target, high < target) if at_least else (high <= target, low > target)
    return "pass" if meets_all else "**MISS**" if misses_all else "within noise"


def format_spread(stats: Optional[Spread]) -> str:
    return "n/a" if stats is None else f"{stats[0]:.2f}x [{stats[1]:.2f}-{stats[2]:.2f}]"


# -- aten op counting --------------------------------------------------------------------------------------------------
# Ops that copy a device value to the host (a GPU -> CPU synchronisation): `.item()` / `bool(tensor)` reach
# `_local_scalar_dense`; data-dependent output shapes (nonzero, masked_select, unique, boolean indexing) must read the
# count back before allocating.
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
                      "unique_consecutive", "unique_dim", "repeat_interleave"})


# Ops that return a new tensor header on the input's storage without an `alias_info` in their schema, so `is_view`
# misses them: `_unsafe_view` is `view` for outputs autograd need not track as aliases (what `reshape` of a fresh tensor
# emits).
_UNTRACKED_VIEWS = frozenset({"_unsafe_view", "_reshape_alias"})


def is_view_op(func) -> bool:
    """True for metadata-only ops (view, t, expand, detach, slice, ...): no kernel runs, no memory is touched.

    The schema says it: a view op returns an alias of an input that it does not write (``Tensor(a)``), which
    ``OpOverload.is_view`` reads; in-place ops (``Tensor(a!)``) write, so they stay kernels.
    """
    return bool(func.is_view) or func.overloadpacket.__name__ in _UNTRACKED_VIEWS


class AtenOpCounter(TorchDispatchMode):
    """Counts every aten operator dispatched while active (forward and the autograd backward alike).

    ``counts`` holds every op; ``kernel_counts`` only the ops that run a kernel (views and aliases such as ``t``,
    ``view``, ``expand``, ``detach`` are excluded: on a GPU they launch nothing). The kernel count is the
    device-independent proxy for launch overhead. Host-synchronising ops are collected separately in ``syncs``.
    """

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.kernel_counts: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] += 1
        if not is_view_op(func):
            self.kernel_counts[name] += 1
        if name in SYNC_OPS:
            self.syncs[name] += 1
        elif name == "index" and _has_bool_index(args):
            self.syncs["index(bool mask)"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def kernels(self) -> int:
        return sum(self.kernel_counts.values())


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (indices or ()))


# -- memory ------------------------------------------------------------------------------------------------------------
def tensor_bytes(tensors) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen or key == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def persistent_bytes(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> int:
    """Bytes of parameters, buffers, gradients and optimizer state alive between steps."""
    tensors = list(model.parameters()) + list(model.buffers()) + [p.grad for p in model.parameters()]
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return tensor_bytes(tensors)


CPU_MEMORY_METHOD = ("CPU: params + buffers + grads + AdamW state (bytes of live storages) + the peak of the running "
                     "sum of the CPU allocator's allocation / free records over one step, from torch.profiler("
                     "profile_memory=True)")
CUDA_MEMORY_METHOD = "CUDA: torch.cuda.max_memory_allocated over one step"


def step_peak_bytes(step: Callable[[], object], model: nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device) -> int:
    """Peak bytes of one training step ``step()`` (see ``CPU_MEMORY_METHOD`` / ``CUDA_MEMORY_METHOD``)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device)
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    base = persistent_bytes(model, optimizer)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # The allocator reports every allocation (+bytes) and free (-bytes) as a "[memory]" record; their running sum in
    # time order is the live-bytes curve of the step relative to its start, frees outside any op included. The raw
    # records are read directly: building the profiler's per-op event tree (`prof.events()`) for the ~10^5 ops of a
    # model step took minutes and is not needed for this sum.
    cpu = (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP)
    records = sorted(((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                      if e.name() == "[memory]" and e.device_type() in cpu), key=lambda r: r[0])
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return base + peak
