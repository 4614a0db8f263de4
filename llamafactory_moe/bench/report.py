"""Ratios to LoRA, pass / miss against the targets, and the markdown + JSON report."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Optional

from .measure import median

METRICS = ("train_step", "layer_fwd_bwd", "ops", "peak_memory", "generate")
HEADERS = {
    "train_step": "train step (<= {train_step}x)",
    "layer_fwd_bwd": "layer fwd+bwd (<= {layer_fwd_bwd}x)",
    "ops": "kernel ops E={e0} / E={e1} (LoRA; <= {ops_vs_lora}x, flat in E); all aten ops",
    "peak_memory": "peak memory (<= {peak_memory}x)",
    "generate": "generate tok/s (>= {generate}x)",
}


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    if num is None or den is None or den == 0 or math.isnan(num) or math.isnan(den):
        return None
    return num / den


def _median_of(variant: dict, key: str) -> Optional[float]:
    values = variant.get(key)
    return median(values) if values else None


def compare(case: dict, variant: dict, baseline: dict, experts: tuple[int, int]) -> dict:
    """Ratios of one case to one LoRA baseline, and pass / miss per metric (None = not measured)."""
    t = case["targets"]
    ratios: dict[str, Optional[float]] = {
        "train_step": _ratio(_median_of(variant, "train_step_s"), _median_of(baseline, "train_step_s")),
        "layer_fwd_bwd": _ratio(_median_of(variant, "layer_s"), _median_of(baseline, "layer_s")),
        "peak_memory": _ratio(variant.get("peak_bytes"), baseline.get("peak_bytes")),
        # tokens/s ratio = inverse of the time ratio
        "generate": _ratio(_median_of(baseline, "generate_s"), _median_of(variant, "generate_s")),
    }
    passed: dict[str, Optional[bool]] = {
        "train_step": None if ratios["train_step"] is None else ratios["train_step"] <= t["train_step"],
        "layer_fwd_bwd": None if ratios["layer_fwd_bwd"] is None else ratios["layer_fwd_bwd"] <= t["layer_fwd_bwd"],
        "peak_memory": None if ratios["peak_memory"] is None else ratios["peak_memory"] <= t["peak_memory"],
        "generate": None if ratios["generate"] is None else ratios["generate"] >= t["generate"],
    }
    counts = {}
    for key in ("kernel_ops", "ops"):  # kernel ops carry the <= target; both must be flat in E
        ops = variant.get(key) or {}
        e0, e1 = (ops.get(str(e)) for e in experts)
        if not case.get("experts_fields"):  # no expert axis: one count stands for both E
            e0 = e1 = ops.get("None")
        counts[key] = {"E0": e0, "E1": e1, "lora": (baseline.get(key) or {}).get("None")}
    kernel, every = counts["kernel_ops"], counts["ops"]
    ratios["ops"] = _ratio(kernel["E1"], kernel["lora"])
    ratios["all_ops"] = _ratio(every["E1"], every["lora"])
    passed["ops"] = None if ratios["ops"] is None else (kernel["E0"] == kernel["E1"] and every["E0"] == every["E1"]
                                                        and ratios["ops"] <= t["ops_vs_lora"])
    return {"ratios": ratios, "pass": passed, "ops": kernel, "all_ops": every}


def extra_ops(variant: dict, baseline: dict, experts: tuple[int, int], top: int = 8) -> dict[str, int]:
    """The kernel ops the method runs beyond LoRA's per layer forward + backward (at the larger E), most first."""
    breakdown = variant.get("kernel_op_breakdown") or {}
    mine = Counter(breakdown.get(str(experts[1])) or breakdown.get("None") or {})
    theirs = Counter((baseline.get("kernel_op_breakdown") or {}).get("None") or {})
    diff = mine.copy()
    diff.subtract(theirs)
    return {k: v for k, v in diff.most_common(top) if v > 0}


def analyse(result: dict) -> dict:
    """Add ``vs_rank`` / ``vs_params`` comparisons and the extra-op breakdown to every case, in place."""
    experts = tuple(result["settings"]["ops_experts"])
    variants = result["variants"]
    for case in result["cases"]:
        variant = variants.get(case["label"])
        if variant is None:
            continue
        for key, rank in (("vs_rank", case["total_rank"]), ("vs_params", case["param_matched_rank"])):
            baseline = variants.get(f"lora-r{rank}")
            if baseline is not None:
                case[key] = dict(compare(case, variant, baseline, experts), baseline=f"lora-r{rank}")
        rank_base = variants.get(f"lora-r{case['total_rank']}")
        if rank_base is not None:
            case["extra_ops_vs_lora"] = extra_ops(variant, rank_base, experts)
    return result


# -- markdown ------------------------------------------------------------------------------------------------------
def _cell(comparison: dict, metric: str) -> str:
    ratio, ok = comparison["ratios"].get(metric), comparison["pass"].get(metric)
    if metric == "ops":
        o, a = comparison["ops"], comparison.get("all_ops") or {}
        if o["E0"] is None or ratio is None:
            return "n/a"
        text = f"{o['E0']} / {o['E1']} ({o['lora']}) = {ratio:.2f}x"
        if a.get("E0") is not None:
            text += f"; all {a['E0']} / {a['E1']} ({a['lora']})"
    elif ratio is None:
        return "n/a"
    else:
        text = f"{ratio:.2f}x"
    return f"{text} pass" if ok else f"{text} **MISS**"


def _comparison_table(result: dict, key: str, title: str) -> list[str]:
    experts = result["settings"]["ops_experts"]
    fmt = dict(result["cases"][0]["targets"] if result["cases"] else {}, e0=experts[0], e1=experts[1])
    lines = [f"### {title}", "",
             "| case | baseline | " + " | ".join(HEADERS[m].format(**fmt) for m in METRICS) + " | host syncs |",
             "|---|---|" + "---|" * len(METRICS) + "---|"]
    for case in result["cases"]:
        label = case["label"]
        if label in result["errors"] and key not in case:
            lines.append(f"| {label} | | " + " | ".join("error" for _ in METRICS) + " | |")
            continue
        comparison = case.get(key)
        if comparison is None:
            continue
        syncs = result["variants"][label].get("host_syncs")
        sync_text = "none" if syncs == {} else ("?" if syncs is None else
                                                 "**" + ", ".join(f"{k} x{v}" for k, v in syncs.items()) + "**")
        train_target = case["targets"]["train_step"]
        target_note = "" if train_target == 1.15 else f" (train target {train_target}x)"
        lines.append(f"| {label}{target_note} | {comparison['baseline']} | "
                     + " | ".join(_cell(comparison, m) for m in METRICS) + f" | {sync_text} |")
    return lines


def _context_table(result: dict) -> list[str]:
    experts = result["settings"]["ops_experts"]
    lines = ["### Absolute numbers (context only: a noisy shared machine)", "",
             "| variant | trainable params | train step ms median (min) | layer fwd+bwd ms median (min) | "
             "peak memory MB | "
             f"generate tok/s | kernel ops (E={experts[0]} / E={experts[1]}) | all aten ops |",
             "|---|---|---|---|---|---|---|---|"]
    for label, v in result["variants"].items():
        def ms(key):
            m = _median_of(v, key)
            return "n/a" if m is None else f"{1000 * m:.1f} ({1000 * min(v[key]):.1f})"
        gen = _median_of(v, "generate_s")
        tok_s = "n/a" if gen is None else f"{v['generate_tokens'] / gen:.1f}"
        peak = v.get("peak_bytes")
        kernel_text, op_text = (" / ".join(str(c) for c in (v.get(key) or {}).values()) or "n/a"
                                for key in ("kernel_ops", "ops"))
        lines.append(f"| {label} | {v.get('trainable_params', 0):,} | {ms('train_step_s')} | {ms('layer_s')} | "
                     f"{'n/a' if peak is None else f'{peak / 2**20:.1f}'} | {tok_s} | {kernel_text} | {op_text} |")
    return lines


def to_markdown(result: dict, header: str = "") -> str:
    s = result["settings"]
    m = result["machine"]
    lines = []
    if header:
        lines += [header, ""]
    lines += [
        f"Model: {result['model']}; targets: {', '.join(result['targets_modules'])}; device {m['device']}, "
        f"{m['torch_threads']} torch thread(s).",
        f"Machine: nproc {m['nproc']}, CPU {m['cpu_model']}, torch {m['torch']}, transformers "
        f"{m.get('transformers')}, peft {m.get('peft')}, Python {m['python']}"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + (f"; load average at start {m['load_average_at_start']}" if "load_average_at_start" in m else "") + ".",
        f"Training step: batch {s['batch_size']} x seq {s['seq_len']}, forward + aux loss + backward + AdamW step, "
        f"median of {s['train_reps']} interleaved steps after {s['train_warmup']} untimed step(s) per variant "
        "(the first of them measures peak memory).",
        f"Single layer: Linear({s['layer_dim']}, {s['layer_dim']}) on {s['layer_tokens']} tokens, forward + backward, "
        f"median of {s['layer_reps']} after {s['layer_warmup']} warm-up. Op counts: what one more wrapped Linear(256, "
        "256) adds to a training forward + aux loss + backward on 32 tokens (8 padding): the count for a stack of two "
        "minus the count for one (per-batch work such as the padding mask's token weights cancels out), counted with a "
        "TorchDispatchMode. "
        "Kernel ops exclude views and aliases (ops whose schema returns an unwritten alias of an input: view, t, "
        "expand, detach, ...), which launch no kernel; the <= target applies to kernel ops, the flat-in-E check to "
        "both counts.",
        f"Generation: greedy generate(), KV cache, prompt {s['prompt_len']}, {s['new_tokens']} new tokens, median of "
        f"{s['gen_reps']}; LoRA unmerged.",
        f"Peak memory: {result['memory_method']}.",
        "Ratios are method / LoRA measured in this run (tokens/s: method / LoRA); pass/miss against the target in each "
        "column header.",
        "",
    ]
    lines += _comparison_table(result, "vs_rank", "Ratios to rank-matched LoRA (rank = the method's total rank)")
    lines += [""]
    lines += _comparison_table(result, "vs_params",
                               "Ratios to parameter-matched LoRA (closest trainable-parameter count)")
    lines += [""]
    lines += _context_table(result)
    lines += ["", "### Extra kernel ops per layer forward + backward vs LoRA (at the larger E)", ""]
    for case in result["cases"]:
        extra = case.get("extra_ops_vs_lora")
        if extra is not None:
            lines.append(f"- {case['label']}: " + (", ".join(f"{k} +{v}" for k, v in extra.items()) or "none"))
    notes = []
    for method in result["missing_bench_config"]:
        notes.append(f"- `{method}`: no bench config (add a row to `BENCH_CASES` in llamafactory_moe/bench/cases.py)")
    for label, error in result["errors"].items():
        notes.append(f"- `{label}` error: {error}")
    for case in result["cases"]:
        if case.get("note"):
            notes.append(f"- `{case['label']}`: {case['note']}; kwargs {case['kwargs']}")
    if notes:
        lines += ["", "### Notes", ""] + notes
    lines += ["", f"Wall time of the run: {result['wall_time_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def render_saved(json_path: str) -> str:
    """Re-render the markdown of a saved run (same data, e.g. after a report-format change)."""
    result = analyse(json.loads(Path(json_path).read_text(encoding="utf-8")))
    return to_markdown(result, header=f"## llamafactory-moe benchmark\n\nCommand: `{result.get('command', '?')}`")


def write(result: dict, markdown: str, md_path: Optional[str], json_path: Optional[str]) -> None:
    if md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(markdown, encoding="utf-8")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
