"""Benchmark harness: every implemented MoE-LoRA method beside stock peft LoRA, measured in one process.

    python -m llamafactory_moe.bench --tiny                       # CI: random 2-layer Llama, ~30 s
    python -m llamafactory_moe.bench --out bench/results/smollm2_cpu   # SmolLM2-135M-Instruct

Measured per method, as ratios to LoRA at the same targets and a matched budget (rank-matched and
parameter-matched; see ``cases.py``): end-to-end training step time, single-layer forward + backward time, aten ops
one more wrapped layer adds to a training forward + backward at E=4 and E=16 (a device-independent proxy for kernel
launches), peak training-step
memory, and ``generate()`` tokens/s with the KV cache. Repetitions of different variants are interleaved.

Modules: ``cases`` (the per-method benchmark configs and targets), ``measure`` (timers, op counter, memory),
``workloads`` (models and the timed closures), ``runner`` (one run), ``report`` (ratios, markdown, JSON),
``compiled`` (``--compile``: layers under ``torch.compile`` beside compiled LoRA, generated kernels, compile time).
"""

# peft first: importing it runs the project's import hook, which registers the methods, which import core. Importing
# core first (as `workloads` does) would start that hook while core is half-initialised.
import peft  # noqa: F401,I001

from .cases import BENCH_CASES, BenchCase, Targets
from .runner import Settings, run

__all__ = ["BENCH_CASES", "BenchCase", "Settings", "Targets", "run"]
