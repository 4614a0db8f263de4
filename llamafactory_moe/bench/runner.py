"""One benchmark run: every implemented method beside stock LoRA, measured interleaved in one process."""

from __future__ import annotations

import os
import platform
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from .cases import BenchCase, selected_cases
from .measure import (CPU_MEMORY_METHOD, CUDA_MEMORY_METHOD, AtenOpCounter, Timer, interleaved_times,
                      step_peak_bytes)
from .workloads import (LLAMA_LINEAR_TARGETS, LinearContainer, LinearStack, build_config, generate_fn, layer_fwd_bwd,
                        lora_params_per_rank, modifies_base, shared_copy, smollm2, tiny_llama, train_variant,
                        trainable_params, wrap)


@dataclass
class Settings:
    tiny: bool = False
    device: str = "cpu"
    threads: int = 1
    seed: int = 0
    model_dir: Optional[str] = None
    methods: Optional[list[str]] = None  # default: every implemented method
    # training step
    batch_size: int = 4
    seq_len: int = 256
    train_warmup: int = 1
    train_reps: int = 5
    # single layer
    layer_dim: int = 2048
    layer_tokens: int = 4096
    layer_warmup: int = 1
    layer_reps: int = 5
    # param-matched LoRA reuses the rank-matched one when their trainable-parameter counts differ by at most this
    # fraction (LoRA's time is flat in the rank at these sizes; it keeps the number of variants, and the run, small)
    param_tolerance: float = 0.10
    # op count
    ops_experts: tuple[int, int] = (4, 16)
    # generation
    prompt_len: int = 32
    new_tokens: int = 32
    gen_warmup: int = 1
    gen_reps: int = 3

    @classmethod
    def for_tiny(cls, **overrides) -> "Settings":
        base = dict(tiny=True, seq_len=64, batch_size=4, train_reps=5, layer_dim=64, layer_tokens=256, layer_reps=5,
                    prompt_len=8, new_tokens=8, gen_reps=3)
        base.update(overrides)
        return cls(**base)


def lora_label(rank: int) -> str:
    return f"lora-r{rank}"


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def machine_info(device: torch.device) -> dict:
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"nproc": os.cpu_count(), "cpu_model": cpu_model, "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device), "torch_threads": torch.get_num_threads()}
    if hasattr(os, "getloadavg"):  # other jobs on the machine: the first thing to check when ratios look odd
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    try:
        import peft
        import transformers

        info.update(peft=peft.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class _Errors(dict):
    """label -> one-line error; a failing variant is reported, never fatal for the others."""

    def guard(self, label: str, phase: str, fn: Callable[[], object]) -> bool:
        try:
            fn()
            return True
        except Exception as exc:  # noqa: BLE001 — reported in the table
            self[label] = f"{phase}: {type(exc).__name__}: {exc}".splitlines()[0][:300]
            _log(f"{label} failed in {phase}:\n{traceback.format_exc()}")
            return False


def run(settings: Settings) -> dict:
    started = time.perf_counter()
    torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    import peft  # noqa: F401  (first: its import hook registers the methods, which import core)

    methods, cases, missing = selected_cases(settings.methods)
    errors = _Errors()
    variants: dict[str, dict] = {}

    # -- models ----------------------------------------------------------------------------------------------------
    if settings.tiny:
        base, model_name = tiny_llama(settings.seed), "tiny random LlamaForCausalLM (hidden 64, 2 layers)"
    else:
        base, model_name = smollm2(settings.model_dir)
    base.to(device).requires_grad_(False)
    targets = LLAMA_LINEAR_TARGETS
    per_rank = lora_params_per_rank(base, targets)
    models: dict[str, torch.nn.Module] = {}
    good_cases: list[BenchCase] = []
    param_rank: dict[str, int] = {}
    for case in cases:
        def build(case=case):
            models[case.label] = wrap(shared_copy(base, share=not modifies_base(case)), build_config(case, targets),
                                      settings.seed)
        if errors.guard(case.label, "build", build):
            good_cases.append(case)
            n = trainable_params(models[case.label])
            param_rank[case.label] = _param_matched_rank(n, per_rank, case.total_rank, settings.param_tolerance)
            variants[case.label] = {"kind": case.method, "trainable_params": n}
    lora_ranks = sorted({c.total_rank for c in good_cases} | set(param_rank.values()))
    for rank in lora_ranks:
        label = lora_label(rank)
        models[label] = wrap(shared_copy(base), build_config(None, targets, lora_rank=rank), settings.seed)
        variants[label] = {"kind": "lora", "rank": rank, "trainable_params": trainable_params(models[label])}
    _log(f"built {len(models)} variants in {time.perf_counter() - started:.0f} s: {', '.join(models)}")

    # -- 1. training step, 4. peak memory ----------------------------------------------------------------------------
    timer = Timer(device)
    gen = torch.Generator().manual_seed(settings.seed)
    vocab = base.config.vocab_size
    input_ids = torch.randint(0, vocab, (settings.batch_size, settings.seq_len), generator=gen).to(device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    steps = {}
    phase = time.perf_counter()
    for label, model in models.items():
        tv = train_variant(model, batch)
        # The first (untimed) step measures the peak memory and is the first warm-up step.
        def first_steps(label=label, tv=tv):
            variants[label]["peak_bytes"] = step_peak_bytes(tv.step, tv.model, tv.optimizer, device)
        if errors.guard(label, "train step", first_steps):
            steps[label] = tv
    _log(f"first training steps + peak memory: {time.perf_counter() - phase:.0f} s")
    phase = time.perf_counter()
    times = interleaved_times({k: v.step for k, v in steps.items()}, timer, max(0, settings.train_warmup - 1),
                              settings.train_reps)
    for label, values in times.items():
        variants[label]["train_step_s"] = values
    _log(f"timed training steps: {time.perf_counter() - phase:.0f} s")
    del steps

    # -- 5. generate() with KV cache ---------------------------------------------------------------------------------
    phase = time.perf_counter()
    prompt = torch.randint(0, vocab, (1, settings.prompt_len), generator=gen).to(device)
    gens = {}
    for label, model in models.items():
        if label in errors:
            continue
        fn = generate_fn(model, prompt, settings.new_tokens)
        if errors.guard(label, "generate", fn):
            gens[label] = fn
    times = interleaved_times(gens, timer, max(0, settings.gen_warmup - 1), settings.gen_reps)
    for label, values in times.items():
        variants[label]["generate_s"] = values
        variants[label]["generate_tokens"] = settings.new_tokens
    _log(f"generate: {time.perf_counter() - phase:.0f} s")
    models.clear()  # free the variants before the layer measurements (closures above still name the dict)
    gens.clear()

    # -- 2. one d x d layer, forward + backward ----------------------------------------------------------------------
    phase = time.perf_counter()
    torch.manual_seed(settings.seed)
    d, n = settings.layer_dim, settings.layer_tokens
    container = LinearContainer(torch.nn.Linear(d, d)).to(device).requires_grad_(False)
    x = torch.randn(n, d, device=device, requires_grad=True)
    grad_out = torch.randn(n, d, device=device)
    layer_fns = {}
    for label, case, rank in _layer_variants(good_cases, lora_ranks, errors):
        def build(label=label, case=case, rank=rank):
            model = wrap(shared_copy(container, share=not modifies_base(case)),
                         build_config(case, ["proj"], lora_rank=rank), settings.seed)
            fn = layer_fwd_bwd(model, x, grad_out)
            fn()  # first warm-up call
            layer_fns[label] = fn
        errors.guard(label, "layer", build)
    times = interleaved_times(layer_fns, timer, max(0, settings.layer_warmup - 1), settings.layer_reps)
    for label, values in times.items():
        variants[label]["layer_s"] = values
    _log(f"single layer: {time.perf_counter() - phase:.0f} s")
    layer_fns.clear()
    x = grad_out = None  # free them (the build closures above still name these variables)

    # -- 3. aten ops per layer forward + backward, host syncs ---------------------------------------------------------
    ops = {}
    for label, case, rank in _layer_variants(good_cases, lora_ranks, errors):
        experts = settings.ops_experts if case is not None and case.experts_fields else (None,)
        def count(label=label, case=case, rank=rank, experts=experts):
            ops[label] = {e: _count_layer_ops(case, rank, e, settings.seed, device) for e in experts}
        errors.guard(label, "op count", count)
    for label, per_e in ops.items():
        variants[label]["ops"] = {str(e): c.total for e, c in per_e.items()}
        variants[label]["kernel_ops"] = {str(e): c.kernels for e, c in per_e.items()}
        variants[label]["op_breakdown"] = {str(e): dict(c.counts.most_common()) for e, c in per_e.items()}
        variants[label]["kernel_op_breakdown"] = {str(e): dict(c.kernel_counts.most_common()) for e, c in per_e.items()}
        variants[label]["host_syncs"] = dict(sum((c.syncs for c in per_e.values()), Counter()))

    settings_dict = asdict(settings)
    return {
        "model": model_name,
        "machine": machine_info(device),
        "settings": settings_dict,
        "targets_modules": targets,
        "memory_method": CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD,
        "methods": methods,
        "missing_bench_config": missing,
        "errors": dict(errors),
        "cases": [dict(label=c.label, method=c.method, kwargs=c.kwargs, total_rank=c.total_rank,
                       param_matched_rank=param_rank.get(c.label), targets=asdict(c.targets), note=c.note,
                       experts_fields=list(c.experts_fields))
                  for c in cases],
        "variants": variants,
        "wall_time_s": time.perf_counter() - started,
    }


def _param_matched_rank(params: int, params_per_rank: int, total_rank: int, tolerance: float) -> int:
    """The LoRA rank with the closest trainable-parameter count, or ``total_rank`` if that is within ``tolerance``."""
    if abs(params - total_rank * params_per_rank) <= tolerance * params:
        return total_rank
    return max(1, round(params / params_per_rank))


def _layer_variants(cases: list[BenchCase], lora_ranks: list[int], errors: dict):
    for case in cases:
        if case.label not in errors:
            yield case.label, case, None
    for rank in lora_ranks:
        yield lora_label(rank), None, rank


def _count_layer_ops(case: Optional[BenchCase], rank: Optional[int], num_experts: Optional[int], seed: int,
                     device: torch.device, dim: int = 256, tokens: int = 32) -> AtenOpCounter:
    """aten ops that one more wrapped layer adds to a training forward + backward: the count for a stack of two wrapped
    ``Linear(dim, dim)`` minus the count for one, on ``tokens`` tokens, a quarter of them padding (the token mask
    reaches the aux losses as in training).

    The difference is what a layer costs inside a deep model: work done once per batch whatever the depth (the
    token weights of the padding mask, which every layer shares; summing the layers' aux terms) cancels out. Host
    syncs are those of the two-layer run."""
    one, two = (_count_stack_ops(case, rank, num_experts, seed, device, dim, tokens, depth) for depth in (1, 2))
    marginal = AtenOpCounter()
    marginal.counts = two.counts - one.counts
    marginal.kernel_counts = two.kernel_counts - one.kernel_counts
    marginal.syncs = two.syncs
    return marginal


def _count_stack_ops(case: Optional[BenchCase], rank: Optional[int], num_experts: Optional[int], seed: int,
                     device: torch.device, dim: int, tokens: int, depth: int) -> AtenOpCounter:
    torch.manual_seed(seed)
    stack = LinearStack(dim, depth).to(device).requires_grad_(False)
    model = wrap(stack, build_config(case, ["proj"], lora_rank=rank, num_experts=num_experts), seed)
    x = torch.randn(tokens, dim, device=device, requires_grad=True)
    token_mask = torch.ones(tokens, dtype=torch.bool, device=device)
    token_mask[-tokens // 4:] = False
    fn = layer_fwd_bwd(model, x, torch.randn(tokens, dim, device=device), token_mask)
    fn()  # warm-up: lazy initialisation must not be counted
    counter = AtenOpCounter()
    with counter:
        fn()
    return counter
