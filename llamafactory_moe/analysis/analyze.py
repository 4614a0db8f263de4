"""``llamafactory-moe analyze``: run a trained adapter over a LLaMA-Factory dataset and draw what its routers do.

(Slightly over ~400 lines: the command, its data loading and its four figures belong together; the statistics it
draws live in ``analysis/statistics.py``.)

Per task (the dataset's task/domain column, else one group per dataset name) every MoE layer's routing summaries are
collected with the same ``MoeLoraLayer.record_routing`` path the training logs use, turned into statistics by
``analysis.statistics`` and written as ``analysis.json`` plus four PNGs:

* ``routing_heatmaps.png``: per layer, task x expert load (fraction of tokens; of gate mass for dense routers),
* ``load_histograms.png``: per layer, the expert load of each task as grouped bars, uniform load dashed,
* ``expert_similarity.png``: per layer, the expert x expert cosine similarity of the experts' weights,
* ``layer_overview.png``: every layer at once: load CV, router entropy and expert similarity against depth.

The per-layer figures show a readable selection of at most ``--max-layers`` layers spread over depth (``--layers``
picks them by a regular expression). Samples run one at a time, so there is no padding to mask.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Optional

from ..errors import MoeError

TASK_COLUMNS = ("task", "domain", "category", "subject", "source")
FIGURES = ("routing_heatmaps.png", "load_histograms.png", "expert_similarity.png", "layer_overview.png")


class AnalyzeError(MoeError):
    """A user mistake: printed as one line, exit code 2 (``llamafactory-moe`` catches every ``MoeError``)."""


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: adapter, dataset
# ---------------------------------------------------------------------------------------------------------------------
def check_adapter(adapter: str) -> str:
    """The adapter's method name, or a one-line error for a wrong path / a non-MoE adapter."""
    from ..checkpoints import our_method_of, peft_type_of

    path = Path(adapter)
    if not path.is_dir():
        raise AnalyzeError(f"--adapter {adapter}: no such directory; point it at a training output_dir (or a "
                           "checkpoint-N inside it)")
    try:
        peft_type = peft_type_of(adapter)
    except Exception as exc:  # MoeConfigError from an unreadable adapter_config.json
        raise AnalyzeError(f"--adapter {adapter}: {exc}") from None
    if peft_type is None:
        raise AnalyzeError(f"--adapter {adapter}: has no adapter_config.json; point it at a training output_dir")
    from ..core.peft_types import METHODS

    method = our_method_of(adapter)
    if method is None:
        routed = ", ".join(name for name, spec in METHODS.items() if spec.config_cls.has_router)
        raise AnalyzeError(f"--adapter {adapter}: is a {peft_type} adapter, not a llamafactory-moe MoE-LoRA adapter; "
                           f"analyze reads the routers of {routed}")
    if not METHODS[method].config_cls.has_router:
        raise AnalyzeError(f"--adapter {adapter}: is a {method} adapter, which has no router and no experts to analyse")
    return method


def _rows_of(dataset_dir: Path, name: str, info: dict) -> list[dict]:
    entry = info[name]
    if "file_name" not in entry:
        raise AnalyzeError(f"--dataset {name}: only local datasets (`file_name` in dataset_info.json) can be "
                           f"analysed; this one is {sorted(k for k in entry if k.endswith('url'))}")
    path = dataset_dir / entry["file_name"]
    if not path.is_file():
        raise AnalyzeError(f"--dataset {name}: its file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def _messages(row: dict, entry: dict) -> Optional[list[dict]]:
    """The row as one user / assistant exchange (alpaca or sharegpt formatting), None if it has neither."""
    columns = entry.get("columns", {})
    if entry.get("formatting", "alpaca") == "sharegpt":
        tags = entry.get("tags", {})
        turns = row.get(columns.get("messages", "conversations")) or []
        role_key, content_key = tags.get("role_tag", "from"), tags.get("content_tag", "value")
        user_roles, bot_roles = {tags.get("user_tag", "human"), "user"}, {tags.get("assistant_tag", "gpt"), "assistant"}
        user = next((t[content_key] for t in turns if t.get(role_key) in user_roles), None)
        bot = next((t[content_key] for t in turns if t.get(role_key) in bot_roles), "")
        return None if user is None else [{"role": "user", "content": user}, {"role": "assistant", "content": bot}]
    prompt = row.get(columns.get("prompt", "instruction")) or ""
    query = row.get(columns.get("query", "input")) or ""
    response = row.get(columns.get("response", "output")) or ""
    if isinstance(response, list):  # preference data: the chosen answer
        response = response[0] if response else ""
    user = "\n".join(part for part in (prompt, query) if part)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": str(response)}] if user else None


def load_dataset_by_task(datasets: list[str], dataset_dir: Path, task_column: Optional[str],
                         max_samples: int) -> tuple[dict[str, list[list[dict]]], Optional[str]]:
    """Task -> up to ``max_samples`` conversations, and the task column used (None: one task per dataset)."""
    info_path = dataset_dir / "dataset_info.json"
    if not info_path.is_file():
        raise AnalyzeError(f"--dataset-dir {dataset_dir}: has no dataset_info.json")
    info = json.loads(info_path.read_text())
    tasks: dict[str, list[list[dict]]] = {}
    used_column = None
    for name in datasets:
        if name not in info:
            raise AnalyzeError(f"--dataset {name}: not in {info_path}; choose one of {sorted(info)}")
        rows = _rows_of(dataset_dir, name, info)
        column = task_column or next((c for c in TASK_COLUMNS if rows and c in rows[0]), None)
        if task_column and rows and task_column not in rows[0]:
            raise AnalyzeError(f"--task-column {task_column}: dataset {name} has no such column; its columns are "
                               f"{sorted(rows[0])}")
        used_column = used_column or column
        for row in rows:
            messages = _messages(row, info[name])
            if messages is None:
                continue
            task = str(row[column]) if column and column in row else name
            group = tasks.setdefault(task, [])
            if len(group) < max_samples:
                group.append(messages)
    if not tasks:
        raise AnalyzeError(f"--dataset {','.join(datasets)}: no usable rows (alpaca or sharegpt formatting)")
    return dict(sorted(tasks.items())), used_column


# ---------------------------------------------------------------------------------------------------------------------
# Forward passes
# ---------------------------------------------------------------------------------------------------------------------
def _encoder(tokenizer, template: Optional[str], cutoff_len: int):
    """messages -> token ids: LLaMA-Factory's template when given, else the plain prompt and answer text."""
    if template:
        from llamafactory.data.template import get_template_and_fix_tokenizer
        from llamafactory.hparams import DataArguments

        try:
            tpl = get_template_and_fix_tokenizer(tokenizer, DataArguments(template=template))
        except ValueError as exc:
            raise AnalyzeError(f"--template {template}: {exc}") from None

        def encode(messages):
            prompt, answer = tpl.encode_oneturn(tokenizer, messages)
            return (prompt + answer)[:cutoff_len]
    else:
        def encode(messages):
            text = messages[0]["content"] + "\n" + messages[1]["content"]
            return tokenizer(text, add_special_tokens=True)["input_ids"][:cutoff_len]
    return encode


def collect_routing(model, tasks: dict[str, list[list[dict]]], encode) -> dict[str, dict[str, dict]]:
    """Task -> layer name -> summed routing summary, one sample per forward (no padding)."""
    import torch

    from ..core import loss_window
    from .statistics import accumulate

    device = next(model.parameters()).device
    out: dict[str, dict[str, dict]] = {}
    for task, samples in tasks.items():
        per_layer = out.setdefault(task, {})
        for messages in samples:
            ids = torch.tensor([encode(messages)], device=device)
            with torch.no_grad(), loss_window.collect(collect_routing=True) as window:
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
            for layer_name, records in window.routing.items():
                for record in records:
                    accumulate(per_layer.setdefault(layer_name, {}), record)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------------
def short_name(layer_name: str) -> str:
    """``base_model.model.model.layers.3.self_attn.q_proj`` -> ``L3 q_proj``."""
    match = re.search(r"layers\.(\d+)\..*?([^.]+)$", layer_name)
    return f"L{match.group(1)} {match.group(2)}" if match else layer_name.split(".")[-1]


def select_layers(layers: list[str], pattern: Optional[str], max_layers: int) -> list[str]:
    if pattern:
        chosen = [name for name in layers if re.search(pattern, name)]
        if not chosen:
            raise AnalyzeError(f"--layers {pattern!r}: matches none of the {len(layers)} MoE layers, e.g. "
                               f"{layers[:3]}")
        layers = chosen
    if len(layers) <= max_layers:
        return layers
    step = (len(layers) - 1) / (max_layers - 1) if max_layers > 1 else 0
    return [layers[round(i * step)] for i in range(max_layers)]


def _grid(plt, count: int, panel: tuple[float, float]):
    cols = min(count, 4)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel[0] * cols, panel[1] * rows), squeeze=False,
                             constrained_layout=True)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def _expert_ticks(ax, num_experts: int, max_ticks: int = 16) -> None:
    step = max(1, math.ceil(num_experts / max_ticks))
    ax.set_xticks(range(0, num_experts, step))


def plot_all(result: dict, shown: list[str], out_dir: Path, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10})
    tasks = list(result["tasks"])
    written = []

    # 1. task x expert routing heatmaps, one shared colour scale.
    loads = {layer: np.array([result["tasks"][t]["layers"][layer]["load"] for t in tasks]) for layer in shown}
    vmax = max(float(v.max()) for v in loads.values())
    fig, axes = _grid(plt, len(shown), (4.2, 0.45 * len(tasks) + 1.6))
    for ax, layer in zip(axes, shown):
        image = ax.imshow(loads[layer], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(short_name(layer))
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(tasks)), tasks if ax in axes[::4] else [""] * len(tasks))
        _expert_ticks(ax, loads[layer].shape[1])
    fig.colorbar(image, ax=axes, label="expert load (fraction of routed tokens or gate mass)", shrink=0.9)
    fig.suptitle(f"{title}: routing per task (rows) and expert (columns)")
    fig.savefig(out_dir / FIGURES[0], dpi=110)
    plt.close(fig)
    written.append(FIGURES[0])

    # 2. load histograms: grouped bars per task, uniform load dashed.
    fig, axes = _grid(plt, len(shown), (4.2, 3.0))
    colors = plt.get_cmap("tab10")
    for ax, layer in zip(axes, shown):
        matrix = loads[layer]
        num_experts = matrix.shape[1]
        width = 0.8 / len(tasks)
        for i, task in enumerate(tasks):
            ax.bar(np.arange(num_experts) + (i - (len(tasks) - 1) / 2) * width, matrix[i], width=width,
                   color=colors(i % 10), label=task)
        ax.axhline(1.0 / num_experts, color="black", linestyle="--", linewidth=1, label="uniform")
        ax.set_title(short_name(layer))
        ax.set_xlabel("expert")
        ax.set_ylabel("load")
        _expert_ticks(ax, num_experts)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), fontsize=9)
    fig.suptitle(f"{title}: expert load per task")
    fig.savefig(out_dir / FIGURES[1], dpi=110)
    plt.close(fig)
    written.append(FIGURES[1])

    # 3. expert similarity matrices (signed cosine; the logged scalar is the mean |cos| off the diagonal).
    with_sim = [layer for layer in shown if layer in result["expert_similarity"]]
    if with_sim:
        fig, axes = _grid(plt, len(with_sim), (3.6, 3.3))
        for ax, layer in zip(axes, with_sim):
            sim = result["expert_similarity"][layer]
            matrix = np.array(sim["matrix"])
            image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
            ax.set_title(f"{short_name(layer)}  mean|cos| {sim['mean_abs_cos']:.2f}")
            ax.set_xlabel("expert")
            ax.set_ylabel("expert")
            _expert_ticks(ax, matrix.shape[0], max_ticks=8)  # square panels: fewer labels than the heatmaps
            ax.set_yticks(ax.get_xticks())
        fig.colorbar(image, ax=axes, label="cosine similarity of expert weights", shrink=0.9)
        fig.suptitle(f"{title}: expert weight similarity")
        fig.savefig(out_dir / FIGURES[2], dpi=110)
        plt.close(fig)
        written.append(FIGURES[2])

    # 4. every layer against depth: one line per module type (q_proj, ...) over the decoder layer index, which reads
    # better than all wrapped modules in a row (their types alternate, so one line would zigzag).
    layers = result["layers"]
    overall = result["all_tasks"]["layers"]
    positions = {}
    for i, layer in enumerate(layers):
        match = re.search(r"layers\.(\d+)\..*?([^.]+)$", layer)
        positions[layer] = (int(match.group(1)), match.group(2)) if match else (i, "MoE layers")
    modules = list(dict.fromkeys(module for _, module in positions.values()))
    depth = sorted({d for d, _ in positions.values()})
    fig, axes = plt.subplots(3, 1, figsize=(max(8.0, 0.25 * len(depth) + 4), 8), sharex=True,
                             constrained_layout=True)
    series = [("load_cv", "load CV (0 = balanced)"), ("router_entropy", "router entropy / log E"),
              ("expert_similarity", "expert similarity\n(mean |cos|)")]
    for ax, (key, label) in zip(axes, series):
        for j, module in enumerate(modules):
            members = [layer for layer in layers if positions[layer][1] == module]
            values = [overall[layer].get(key) if key != "expert_similarity"
                      else result["expert_similarity"].get(layer, {}).get("mean_abs_cos") for layer in members]
            ax.plot([positions[layer][0] for layer in members], [np.nan if v is None else v for v in values],
                    marker="o", markersize=3, color=colors(j % 10), label=module)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, title="module")
    axes[-1].set_xlabel("decoder layer" if len(modules) > 1 or modules[0] != "MoE layers" else "MoE layer")
    axes[-1].set_xticks(depth[::max(1, math.ceil(len(depth) / 32))])
    fig.suptitle(f"{title}: routing statistics of every layer (all tasks)")
    fig.savefig(out_dir / FIGURES[3], dpi=110)
    plt.close(fig)
    written.append(FIGURES[3])
    return written


# ---------------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------------
def analyze(args: argparse.Namespace) -> dict:
    import torch

    from .statistics import (accumulate, cosine_similarity_matrix, expert_similarity, model_expert_vectors,
                             routing_metrics)

    for flag, value in (("--max-samples", args.max_samples), ("--max-layers", args.max_layers),
                        ("--cutoff-len", args.cutoff_len)):
        if value < 1:
            raise AnalyzeError(f"{flag} must be >= 1; got {value}")
    method = check_adapter(args.adapter)
    dataset_dir = Path(args.dataset_dir) if args.dataset_dir else None
    if dataset_dir is None:
        from ..data import demo_data_dir

        dataset_dir = Path("data") if Path("data", "dataset_info.json").is_file() else demo_data_dir()
    datasets = [name.strip() for name in args.dataset.split(",") if name.strip()]
    tasks, task_column = load_dataset_by_task(datasets, dataset_dir, args.task_column, args.max_samples)

    import llamafactory_moe  # noqa: F401  (registers our PEFT types)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        base = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    except (OSError, ValueError) as exc:  # a missing path or an invalid hub id
        raise AnalyzeError(f"--model {args.model}: cannot be loaded ({str(exc).splitlines()[0]})") from None
    try:
        model = PeftModel.from_pretrained(base, args.adapter).eval()
    except RuntimeError as exc:  # size mismatch: the adapter was trained on another base model
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        detail = next((line for line in lines if "size mismatch" in line), lines[0] if lines else "")
        raise AnalyzeError(f"--adapter {args.adapter}: does not fit --model {args.model} ({detail}); use the base "
                           "model it was trained on") from None
    encode = _encoder(tokenizer, args.template, args.cutoff_len)

    routing = collect_routing(model, tasks, encode)
    from ..core.layer import MoeLoraLayer

    recorded = {layer for per_layer in routing.values() for layer in per_layer}
    layer_names = [m.moe_layer_name for m in model.modules()  # model order, not alphabetical (layers.10 < layers.2)
                   if isinstance(m, MoeLoraLayer) and m.moe_layer_name in recorded]
    vectors = model_expert_vectors(model)
    similarity = {name: {"mean_abs_cos": expert_similarity(v),
                         "matrix": [[round(float(c), 4) for c in row] for row in cosine_similarity_matrix(v)]}
                  for name, v in vectors.items() if v.shape[0] >= 2 and name in layer_names}

    result = {"model": args.model, "adapter": str(args.adapter), "method": method, "dataset": datasets,
              "task_column": task_column, "layers": layer_names, "tasks": {}, "expert_similarity": similarity}
    totals: dict[str, dict] = {}
    for task, per_layer in routing.items():
        overall, stats = routing_metrics(per_layer, {k: v["mean_abs_cos"] for k, v in similarity.items()})
        result["tasks"][task] = {"samples": len(tasks[task]), "overall": overall, "layers": stats}
        for layer, summary in per_layer.items():
            accumulate(totals.setdefault(layer, {}), summary)
    overall, stats = routing_metrics(totals, {k: v["mean_abs_cos"] for k, v in similarity.items()})
    result["all_tasks"] = {"samples": sum(len(s) for s in tasks.values()), "overall": overall, "layers": stats}

    out_dir = Path(args.output_dir or Path(args.adapter) / "analysis")
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = select_layers(layer_names, args.layers, args.max_layers)
    result["figures"] = plot_all(result, shown, out_dir, f"{method} on {','.join(datasets)}")
    result["figure_layers"] = shown
    (out_dir / "analysis.json").write_text(json.dumps(result, indent=1))
    return result


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "analyze", help="run a trained adapter over a dataset; write routing heatmaps, load histograms, expert "
                        "similarity PNGs and analysis.json",
        description="Run a trained adapter over a LLaMA-Factory dataset and draw what its routers do (routing per "
                    "task and expert, expert load, expert similarity); see llamafactory_moe/analysis/analyze.py.")
    parser.add_argument("--model", required=True, help="base model (path or cached hub id) the adapter was trained on")
    parser.add_argument("--adapter", required=True, help="adapter directory (a training output_dir or checkpoint)")
    parser.add_argument("--dataset", required=True, help="LLaMA-Factory dataset name(s) from dataset_info.json, "
                                                          "comma-separated")
    parser.add_argument("--dataset-dir", default=None,
                        help="directory holding dataset_info.json (default: ./data if present, else the packaged "
                             "moe_demo data)")
    parser.add_argument("--template", default=None,
                        help="LLaMA-Factory chat template used in training (e.g. llama3); default: plain prompt + "
                             "answer text")
    parser.add_argument("--task-column", default=None,
                        help=f"column that splits rows into tasks (default: the first of {', '.join(TASK_COLUMNS)} "
                             "present; else one task per dataset)")
    parser.add_argument("--max-samples", type=int, default=64, help="samples per task (default 64)")
    parser.add_argument("--cutoff-len", type=int, default=256, help="tokens per sample (default 256)")
    parser.add_argument("--layers", default=None, help="regular expression choosing the layers drawn per layer "
                                                       "(default: a spread over depth)")
    parser.add_argument("--max-layers", type=int, default=8, help="layers drawn in the per-layer figures (default 8)")
    parser.add_argument("--output-dir", default=None, help="default: <adapter>/analysis")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = analyze(args)  # AnalyzeError: printed as one line by `llamafactory-moe` (cli.main)
    out_dir = Path(args.output_dir or Path(args.adapter) / "analysis")
    summary = result["all_tasks"]["overall"]
    print(f"{result['method']}: {len(result['tasks'])} tasks, {len(result['layers'])} MoE layers, "
          f"{result['all_tasks']['samples']} samples")
    for key, value in summary.items():
        print(f"  {key} = {value:.4f}")
    for name in ["analysis.json", *result["figures"]]:
        print(f"wrote {out_dir / name}")
    return 0
