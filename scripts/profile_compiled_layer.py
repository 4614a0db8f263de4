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

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from llamafactory_moe.bench.cases import BENCH_CASES
from llamafactory_moe.bench.workloads import LinearContainer, build_config, layer_fwd_bwd, shared_copy, wrap

STEPS = 20
DENSE_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::copy_")


def profiled(label: str, x: torch.Tensor, grad_out: torch.Tensor) -> profile:
    cases = {case.label: case for rows in BENCH_CASES.values() for case in rows}
    if label != "lora" and label not in cases:
        raise SystemExit(f"unknown label {label!r}: use lora or one of {', '.join(cases)}")
    case = cases.get(label)
    container = LinearContainer(torch.nn.Linear(x.shape[1], grad_out.shape[1])).requires_grad_(False)
    model = wrap(shared_copy(container), build_config(case, ["proj"], lora_rank=None if case else 32), seed=0)
    step = layer_fwd_bwd(torch.compile(model, backend="inductor", fullgraph=True), x, grad_out)
    for _ in range(5):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(STEPS):
            step()
    return prof


def report(label: str, prof: profile) -> str:
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
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

    cases = {case.label: case for rows in BENCH_CASES.values() for case in rows}
    base = smollm2()[0]
    prompt = torch.randint(0, base.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    mode = "Compiled (static cache, inductor, fullgraph)" if compiled else "Eager"
    print(f"## {mode} decode profile, SmolLM2-135M, batch 1, {new_tokens} new tokens, 1 torch thread\n")
    print(f"Command: `python scripts/profile_compiled_layer.py {' '.join(sys.argv[1:])}`. Per generated token = the "
          f"whole `generate()` call (prefill included) divided by {new_tokens}.\n")
    for label in labels:
        case = cases.get(label)
        model = wrap(shared_copy(base), build_config(case, LLAMA_LINEAR_TARGETS, lora_rank=None if case else 32), 0)
        if compiled:
            torch._dynamo.reset()
            step = compiled_generate_fn(model, prompt, new_tokens, compile_config())
            step()  # compiles the decode graph
        else:
            step = generate_fn(model, prompt, new_tokens)
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ops)
        print(f"### {label}: {total / new_tokens / 1000:.2f} ms self CPU per generated token, "
              f"{sum(e.count for e in ops if e.key.startswith('aten::')) // new_tokens} aten ops per token\n")
        print("| op | calls / token | ms / token |\n|---|---|---|")
        for e in ops[:12]:
            print(f"| `{e.key[:60]}` | {e.count / new_tokens:.1f} | {e.self_cpu_time_total / new_tokens / 1000:.3f} |")
        print()


def main(labels: list[str]) -> None:
    torch.set_num_threads(1)
    if labels and labels[0] == "--decode":
        compiled = len(labels) > 1 and labels[1] == "--compiled"
        return profiled_decode(labels[1 + compiled:], compiled=compiled)
    torch.manual_seed(0)
    x = torch.randn(1024, 576, requires_grad=True)
    grad_out = torch.randn(1024, 576)
    print("## Compiled layer profile, 576 -> 576, 1024 tokens, fwd + bwd, 1 torch thread\n")
    print(f"Command: `python scripts/profile_compiled_layer.py {' '.join(labels)}`\n")
    for label in labels:
        print(report(label, profiled(label, x, grad_out)))


if __name__ == "__main__":
    main(sys.argv[1:] or ["lora", "smore-1layer", "smore-2layer"])
