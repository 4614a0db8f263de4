"""Where a compiled wrapped layer spends its time: torch.profiler over its training forward + backward.

    python scripts/profile_compiled_layer.py lora smore-1layer smore-2layer moelora \
        > bench/results/smollm2_cpu_compiled_profile.md
    python scripts/profile_compiled_layer.py --decode lora smore-1layer smore-2layer \
        > bench/results/smollm2_cpu_decode_profile.md
    python scripts/profile_compiled_layer.py --decode --compiled lora smore-2layer \
        > bench/results/smollm2_cpu_compiled_decode_profile.md

Each label is a benchmark case (``llamafactory_moe.bench.cases``) or ``lora`` (stock LoRA, rank 32). The layer is the
compiled benchmark's 576 -> 576 SmolLM2-shaped linear (1024 tokens, ``torch.compile(fullgraph=True)``, inductor,
1 torch thread). Printed per label: self CPU time per op, then every GEMM and copy by input shape (per step, averaged
over 20 profiled steps after 5 warm-up steps). The profiler adds its own overhead: compare labels, not absolute
times.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from llamafactory_moe.bench.cases import BENCH_CASES, BenchCase
from llamafactory_moe.bench.workloads import LinearContainer, build_config, layer_fwd_bwd, shared_copy, wrap

STEPS = 20
DENSE_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::copy_")
CASES = {case.label: case for rows in BENCH_CASES.values() for case in rows}


def case_label(label: str) -> str:
    """argparse type of a label: ``lora`` or a benchmark case, checked before any model is built."""
    if label != "lora" and label not in CASES:
        raise argparse.ArgumentTypeError(f"unknown label {label!r}: use lora or one of {', '.join(CASES)}")
    return label


def wrapped(base: nn.Module, label: str, targets: list[str]) -> nn.Module:
    """``base`` (shared weights) wrapped by the label's method, or by stock LoRA rank 32 for ``lora``."""
    case: Optional[BenchCase] = CASES.get(label)
    return wrap(shared_copy(base), build_config(case, targets, lora_rank=None if case else 32), seed=0)


def top_ops(prof: profile) -> tuple[list, float]:
    """The profile's ops by self CPU time, most first, and their total self CPU time (microseconds)."""
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return ops, sum(e.self_cpu_time_total for e in ops)


def profiled(label: str, x: torch.Tensor, grad_out: torch.Tensor) -> profile:
    container = LinearContainer(nn.Linear(x.shape[1], grad_out.shape[1])).requires_grad_(False)
    model = wrapped(container, label, ["proj"])
    step = layer_fwd_bwd(torch.compile(model, backend="inductor", fullgraph=True), x, grad_out)
    for _ in range(5):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(STEPS):
            step()
    return prof


def report(label: str, prof: profile) -> str:
    ops, total = top_ops(prof)
    lines = [f"### {label}: {total / STEPS / 1000:.2f} ms self CPU per forward + backward", "",
             "| op | calls / step | ms / step | share |", "|---|---|---|---|"]
    for e in ops[:12]:
        lines.append(f"| `{e.key[:60]}` | {e.count // STEPS} | {e.self_cpu_time_total / STEPS / 1000:.3f} | "
                     f"{100 * e.self_cpu_time_total / total:.1f}% |")
    lines += ["", "| GEMM / copy | input shapes | calls / step | ms / step |", "|---|---|---|---|"]
    by_shape = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    for e in by_shape:
        if e.key in DENSE_OPS and e.self_cpu_time_total / STEPS >= 20:  # >= 20 us per step
            shapes = [s for s in e.input_shapes if s]
            lines.append(f"| `{e.key}` | {shapes} | {e.count // STEPS} | {e.self_cpu_time_total / STEPS / 1000:.3f} |")
    return "\n".join(lines) + "\n"


def profiled_decode(labels: list[str], new_tokens: int = 16, compiled: bool = False) -> None:
    """``--decode``: greedy ``generate()`` (batch 1, 32-token prompt, KV cache) on SmolLM2-135M, all 7 linear targets
    wrapped: ops per generated token (prefill included), to see what a decode step pays beside LoRA. ``--decode
    --compiled``: the compiled decode path of ``bench --compile-generate`` (static cache, inductor, fullgraph)."""
    from llamafactory_moe.bench.compiled_generate import compile_config, compiled_generate_fn
    from llamafactory_moe.bench.workloads import LLAMA_LINEAR_TARGETS, generate_fn, smollm2

    base = smollm2()[0]
    prompt = torch.randint(0, base.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    mode = "Compiled (static cache, inductor, fullgraph)" if compiled else "Eager"
    print(f"## {mode} decode profile, SmolLM2-135M, batch 1, {new_tokens} new tokens, 1 torch thread\n")
    print(f"Command: `python scripts/profile_compiled_layer.py {' '.join(sys.argv[1:])}`. Per generated token = the "
          f"whole `generate()` call (prefill included) divided by {new_tokens}.\n")
    for label in labels:
        model = wrapped(base, label, LLAMA_LINEAR_TARGETS)
        if compiled:
            torch._dynamo.reset()
            step = compiled_generate_fn(model, prompt, new_tokens, compile_config())
            step()  # compiles the decode graph
        else:
            step = generate_fn(model, prompt, new_tokens)
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        ops, total = top_ops(prof)
        print(f"### {label}: {total / new_tokens / 1000:.2f} ms self CPU per generated token, "
              f"{sum(e.count for e in ops if e.key.startswith('aten::')) // new_tokens} aten ops per token\n")
        print("| op | calls / token | ms / token |\n|---|---|---|")
        for e in ops[:12]:
            print(f"| `{e.key[:60]}` | {e.count / new_tokens:.1f} | {e.self_cpu_time_total / new_tokens / 1000:.3f} |")
        print()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels", nargs="*", type=case_label, default=["lora", "smore-1layer", "smore-2layer"])
    parser.add_argument("--decode", action="store_true", help="profile SmolLM2 generate() instead of one layer")
    parser.add_argument("--compiled", action="store_true", help="with --decode: the compiled decode path")
    args = parser.parse_args(argv)
    if args.compiled and not args.decode:
        parser.error("--compiled needs --decode (the layer profile is always compiled)")
    torch.set_num_threads(1)
    if args.decode:
        return profiled_decode(args.labels, compiled=args.compiled)
    torch.manual_seed(0)
    x = torch.randn(1024, 576, requires_grad=True)
    grad_out = torch.randn(1024, 576)
    print("## Compiled layer profile, 576 -> 576, 1024 tokens, fwd + bwd, 1 torch thread\n")
    print(f"Command: `python scripts/profile_compiled_layer.py {' '.join(args.labels)}`\n")
    for label in args.labels:
        print(report(label, profiled(label, x, grad_out)))


if __name__ == "__main__":
    main(sys.argv[1:])
