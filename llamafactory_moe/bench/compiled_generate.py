"""``--compile-generate``: greedy decoding with a static KV cache and a compiled forward, every method beside stock
LoRA.

What transformers documents for compiled generation: ``generate(..., cache_implementation="static",
compile_config=CompileConfig(...))``. The prompt (prefill) runs eagerly; every decode step after it calls the model's
``torch.compile``'d ``__call__`` (``PreTrainedModel.get_compiled_call``) on the fixed-shape static cache. Transformers
compiles automatically on CUDA only; on CPU ``compile_config._compile_all_devices = True`` opts in. Our adapters stay
unmerged: the compiled graph is the base model with every wrapped linear's routed update traced into it.

Per variant (each bench case and the rank-matched stock LoRA, all 7 linear targets, same prompt and number of new
tokens for all):

* **first call**: wall time of the first compiled ``generate()`` call (dynamo + inductor for the decode graph, plus
  the eager prefill and the decode steps themselves), with inductor's FX-graph and AOTAutograd caches off so every
  variant compiles its own code (the on-disk C++ build cache stays, as in ``bench/compiled.py``); the number of graphs
  dynamo compiled then, and the graph breaks it met (the compile uses ``fullgraph=True``, so a break fails the variant);
* **tokens/s**: ``rounds`` rounds, each ``reps`` interleaved repetitions of every compiled and eager ``generate()``;
  tokens/s = new tokens / wall time of the call (prefill included, as in the eager benchmark); the ratio to LoRA is
  taken per round (compiled to compiled LoRA, eager to eager LoRA) and shown as median [min-max over rounds];
* **recompilations**: graphs compiled during the timed rounds (must be 0: every decode step reuses the one graph);
* **tokens**: whether the compiled generation produced the same tokens as the eager one (DynamicCache, no compile).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Optional

import torch

from .cases import BenchCase, selected_cases
from .compiled import _fresh_inductor
from .measure import Timer, format_spread, interleaved_times, round_ratios, spread_verdict
from .workloads import (LLAMA_LINEAR_TARGETS, build_config, generate_fn, modifies_base, shared_copy, smollm2,
                        tiny_llama, wrap)

GENERATE_VS_LORA = 0.80  # compiled generate() tokens/s vs compiled LoRA, >=


def _log(message: str) -> None:
    print(f"[bench --compile-generate] {message}", file=sys.stderr, flush=True)


def compile_config(backend: str = "inductor", mode: Optional[str] = "reduce-overhead", fullgraph: bool = True):
    """transformers' ``CompileConfig`` for ``generate()``, opted in on every device (transformers compiles on CUDA only
    by default). ``reduce-overhead`` is transformers' default mode (CUDA graphs on GPU; on CPU inductor's plain
    code)."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=fullgraph, backend=backend, mode=mode)
    config._compile_all_devices = True
    return config


def compiled_generate_fn(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int,
                         config) -> Callable[[], torch.Tensor]:
    """Greedy ``generate()`` with the static cache and the compiled forward, exactly ``new_tokens`` tokens (EOS
    ignored); returns the sequences."""
    model.eval()
    attention_mask = torch.ones_like(input_ids)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0,
                                 eos_token_id=None, cache_implementation="static", compile_config=config)

    return run


def _dynamo_stats() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process, from dynamo's counters."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def run_compiled_generate(settings, rounds: int = 3) -> dict:
    started = time.perf_counter()
    torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    from .runner import lora_label, machine_info

    methods, cases, missing = selected_cases(settings.methods)
    machine = machine_info(device)
    ranks = sorted({c.total_rank for c in cases})
    labels: list[tuple[str, Optional[BenchCase], Optional[int]]] = [(lora_label(r), None, r) for r in ranks]
    labels += [(c.label, c, None) for c in cases]
    base = tiny_llama(settings.seed) if settings.tiny else smollm2(settings.model_dir)[0]
    base.to(device).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(settings.seed)
    prompt = torch.randint(0, base.config.vocab_size, (1, settings.prompt_len), generator=gen).to(device)
    config = compile_config()
    timer = Timer(device)
    errors: dict[str, str] = {}
    variants: dict[str, dict] = {}
    fns: dict[str, Callable[[], None]] = {}
    _fresh_inductor()

    for label, case, rank in labels:
        entry = variants.setdefault(label, {})
        try:
            model = wrap(shared_copy(base, share=not modifies_base(case)),
                         build_config(case, LLAMA_LINEAR_TARGETS, lora_rank=rank), settings.seed).eval()
            eager_fn = generate_fn(model, prompt, settings.new_tokens)
            with torch.no_grad():  # the eager tokens, to compare with the compiled ones
                eager_seq = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                           max_new_tokens=settings.new_tokens, min_new_tokens=settings.new_tokens,
                                           do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
            compiled_fn = compiled_generate_fn(model, prompt, settings.new_tokens, config)
            graphs0, breaks0 = _dynamo_stats()
            start = time.perf_counter()
            first = compiled_fn()
            entry["first_call_s"] = time.perf_counter() - start
            graphs1, breaks1 = _dynamo_stats()
            entry["graphs_compiled"], entry["graph_breaks"] = graphs1 - graphs0, breaks1 - breaks0
            second = compiled_fn()  # first steady-state call: must not compile again
            entry["graphs_second_call"] = _dynamo_stats()[0] - graphs1
            entry["same_tokens_as_eager"] = torch.equal(first, eager_seq) and torch.equal(second, eager_seq)
            fns[f"{label}|compiled"], fns[f"{label}|eager"] = compiled_fn, eager_fn
            _log(f"{label}: first compiled generate() {entry['first_call_s']:.1f} s, {entry['graphs_compiled']} "
                 f"graph(s), {entry['graph_breaks']} break(s), same tokens as eager: {entry['same_tokens_as_eager']}")
        except Exception as exc:  # noqa: BLE001 - reported in the table
            errors[label] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            _log(f"{label} failed: {errors[label]}")

    graphs_before = _dynamo_stats()[0]
    for r in range(rounds):
        times = interleaved_times(fns, timer, 0, settings.gen_reps)
        for key, values in times.items():
            label, mode = key.split("|")
            variants[label].setdefault(f"{mode}_s", []).append(statistics.median(values))
        _log(f"round {r + 1}/{rounds} done")
    graphs_during_timing = _dynamo_stats()[0] - graphs_before

    return {
        "mode": "compiled_generate",
        "model": "tiny random LlamaForCausalLM" if settings.tiny else "SmolLM2-135M-Instruct",
        "machine": machine,
        "settings": {"prompt_len": settings.prompt_len, "new_tokens": settings.new_tokens, "reps": settings.gen_reps,
                     "rounds": rounds, "threads": settings.threads, "targets": LLAMA_LINEAR_TARGETS,
                     "compile_config": {"backend": config.backend, "mode": config.mode, "fullgraph": config.fullgraph,
                                        "cache_implementation": "static"}},
        "methods": methods,
        "missing_bench_config": missing,
        "cases": [dict(label=c.label, method=c.method, kwargs=c.kwargs, total_rank=c.total_rank, note=c.note)
                  for c in cases],
        "variants": variants,
        "graphs_during_timing": graphs_during_timing,
        "errors": errors,
        "wall_time_s": time.perf_counter() - started,
    }


# -- report --------------------------------------------------------------------------------------------------------
def to_markdown_compiled_generate(result: dict, header: str = "") -> str:
    s, m = result["settings"], result["machine"]
    cc = s["compile_config"]
    lines = [header, ""] if header else []
    lines += [
        f"Model: {result['model']}, all 7 linear targets; device {m['device']}, {s['threads']} torch thread(s); CPU "
        f"{m['cpu_model']}, nproc {m['nproc']}, torch {m['torch']}; load average at start "
        f"{m.get('load_average_at_start')}.",
        f"Greedy `generate()`, batch 1, prompt {s['prompt_len']} tokens, {s['new_tokens']} new tokens (EOS ignored). "
        f"Compiled: `cache_implementation=\"static\"`, `CompileConfig(fullgraph={cc['fullgraph']}, backend="
        f"\"{cc['backend']}\", mode=\"{cc['mode']}\")` opted in on CPU (`_compile_all_devices`): eager prefill, "
        "compiled decode steps; inductor's FX-graph and AOTAutograd caches off (C++ build cache on). Eager: the "
        "default DynamicCache, no compile (the main benchmark's generate). Times: "
        f"{s['rounds']} rounds of {s['reps']} interleaved repetitions of every compiled and eager variant; tokens/s = "
        "new tokens / call time (prefill included); ratio = per-round tokens/s / LoRA's in the same mode, shown as "
        "median [min-max over rounds]. Verdict: pass if the whole spread meets the target, MISS if all of it misses, "
        "otherwise within noise. First call: wall time of the first compiled generate() (compilation included).",
        "",
        f"| case | baseline | compiled tok/s | compiled vs compiled LoRA (>= {GENERATE_VS_LORA}x) | eager tok/s | "
        "eager vs eager LoRA | compiled / eager speed-up | first call (compile) | graphs / breaks / recompiles | "
        "same tokens as eager |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    variants = result["variants"]
    lora = {c["label"]: f"lora-r{c['total_rank']}" for c in result["cases"]}
    new_tokens = s["new_tokens"]
    for label in list(lora) + sorted(set(lora.values())):
        entry = variants.get(label, {})
        base_label = lora.get(label, label)
        base = variants.get(base_label, {})
        if "compiled_s" not in entry:
            lines.append(f"| {label} | {base_label} | error | | | | | | | |")
            continue
        # tokens/s ratios are time ratios upside down: the baseline's time over this variant's, per round
        c_stats = round_ratios(base.get("compiled_s", []), entry["compiled_s"])
        e_stats = round_ratios(base.get("eager_s", []), entry["eager_s"])
        speedup = round_ratios(entry["eager_s"], entry["compiled_s"])
        c_tok = new_tokens / statistics.median(entry["compiled_s"])
        e_tok = new_tokens / statistics.median(entry["eager_s"])
        verdict = f" {spread_verdict(c_stats, GENERATE_VS_LORA, at_least=True)}" if label in lora else ""
        lines.append(f"| {label} | {base_label} | {c_tok:.1f} | {format_spread(c_stats)}{verdict} | {e_tok:.1f} | "
                     f"{format_spread(e_stats)} | {format_spread(speedup)} | {entry['first_call_s']:.0f} s | "
                     f"{entry['graphs_compiled']} / {entry['graph_breaks']} / {entry['graphs_second_call']} | "
                     f"{'yes' if entry['same_tokens_as_eager'] else 'NO'} |")
    lines.append("")
    lines.append(f"Graphs compiled during the timed rounds (recompilations): {result['graphs_during_timing']}.")
    for method in result.get("missing_bench_config", []):
        lines.append(f"- `{method}`: no bench config")
    for key, error in result["errors"].items():
        lines.append(f"- `{key}` error: {error}")
    lines += ["", f"Wall time of the run: {result['wall_time_s']:.0f} s."]
    return "\n".join(lines) + "\n"
