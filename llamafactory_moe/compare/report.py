"""The outputs of ``llamafactory-moe compare``: ``comparison.md``, ``comparison.json`` and ``curves.png`` (LM loss
and aux loss per method, read from each ``trainer_log.jsonl``), written from every run's outcome.
"""

from __future__ import annotations

import json
from pathlib import Path

from .preset import Preset

# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------

def read_curves(trainer_log: Path) -> dict:
    """Steps, LM loss and aux loss from a ``trainer_log.jsonl``. The logged ``loss`` is what was minimised, the LM
    loss plus the weighted aux terms (``moe_aux_loss``); the LM loss is logged as ``lm_loss`` (logs written before it
    was: their difference). Stock LoRA logs no aux, and its ``loss`` is the LM loss."""
    steps, lm, aux = [], [], []
    if not trainer_log.is_file():
        return dict(steps=steps, lm_loss=lm, aux_loss=None)
    has_aux = False
    for line in trainer_log.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "loss" not in row:
            continue
        extra = row.get("moe_aux_loss")
        has_aux = has_aux or extra is not None
        steps.append(row["current_steps"])
        lm.append(row.get("lm_loss", row["loss"] - (extra or 0.0)))
        aux.append(extra or 0.0)
    return dict(steps=steps, lm_loss=lm, aux_loss=aux if has_aux else None)


def _fmt(value, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else str(value)


def build_table(preset: Preset, outcomes: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows; a cell without a number says why (failed step and log, or OpenCompass gave no result)."""
    tasks: list[str] = []
    for outcome in outcomes:
        for task in (outcome.get("scores") or {}):
            if task not in tasks:
                tasks.append(task)
    # Parameter budgets are shown relative to the stock LoRA row if there is one, else to the first finished run.
    finished = [o for o in outcomes if not o.get("failed")]
    reference = next((o for o in finished if o["finetuning_type"] == "lora"), finished[0] if finished else None)
    header = ["run", "finetuning_type", "trainable params", f"vs {reference['name']}" if reference else "vs first",
              "train loop (s)", "train wall (s)", "eval wall (s)", *tasks, "average"]
    rows = []
    for outcome in outcomes:
        if outcome.get("failed"):
            step = outcome["failed"]["step"]
            rest = [f"failed at {step}"] * (len(header) - 3)
            rows.append([outcome["name"], outcome["finetuning_type"],
                         f"failed at {step}: see {outcome['failed']['log']}",
                         *rest])
            continue
        params = outcome["trainable_params"]
        ratio = f"{params / reference['trainable_params']:.2f}x" if reference else "no reference"
        no_result = f"no result (see {outcome['eval_log']})"
        cells = [outcome["name"], outcome["finetuning_type"], str(params), ratio,
                 _fmt(outcome["train_runtime_s"]) if outcome.get("train_runtime_s") is not None
                 else "not in train_results.json", _fmt(outcome["train_wall_s"]), _fmt(outcome["eval_wall_s"])]
        for task in tasks:
            value = outcome["scores"].get(task, "task not evaluated")
            cells.append(no_result if value is None else _fmt(value))
        cells.append(no_result if outcome.get("average") is None else _fmt(outcome["average"]))
        rows.append(cells)
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_curves(outcomes: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_lm, ax_aux) = plt.subplots(1, 2, figsize=(12, 4.5))
    any_aux = False
    for outcome in outcomes:
        if outcome.get("failed"):
            continue
        curves = read_curves(Path(outcome["trainer_log"]))
        label = f"{outcome['name']} ({outcome['finetuning_type']})"
        line, = ax_lm.plot(curves["steps"], curves["lm_loss"], marker="o", markersize=3, label=label)
        if curves["aux_loss"] is not None:
            any_aux = True
            # e.g. SMoRA balances with a bias update instead of a loss: its aux curve is flat zero, say so.
            zero = not any(curves["aux_loss"])
            ax_aux.plot(curves["steps"], curves["aux_loss"], marker="o", markersize=3, color=line.get_color(),
                        label=label + (": aux = 0" if zero else ""))
        else:
            # Keep one legend entry per method in both panels; a method without an aux loss says so.
            ax_aux.plot([], [], color=line.get_color(), label=f"{label}: no aux loss")
    ax_lm.set(title="LM loss (lm_loss = logged loss - aux loss)", xlabel="training step", ylabel="LM loss")
    ax_aux.set(title="aux loss (weighted, summed over layers)", xlabel="training step", ylabel="aux loss")
    if any_aux and all(v > 0 for line in ax_aux.get_lines() for v in line.get_ydata()):
        ax_aux.set_yscale("log")  # aux terms of different methods differ by orders of magnitude
    for ax in (ax_lm, ax_aux):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def skipped_tasks(outcomes: list[dict]) -> list[str]:
    """Requested tasks the eval config skipped (no test file), read from its warning in the eval logs; they get no
    column, so comparison.md lists them."""
    import re

    found: dict[str, str] = {}
    for outcome in outcomes:
        log = Path(outcome.get("eval_log") or "")
        if log.is_file():
            for task, path in re.findall(r"skipping commonsense task `([^`]+)`: expected (\S+?),? which", log.read_text(
                    errors="replace")):
                found.setdefault(task, path)
    return [f"`{task}` (no {path})" for task, path in found.items()]


def write_outputs(preset: Preset, out_dir: Path, outcomes: list[dict]) -> str:
    header, rows = build_table(preset, outcomes)
    table = markdown_table(header, rows)
    skipped = skipped_tasks(outcomes)
    eval_desc = ", ".join(f"{k}={Path(v).name if k == 'config' else v}" for k, v in preset.eval.items() if k != "env")
    notes = [
        f"# Method comparison: {preset.path.name}",
        "",
        *( [preset.description, ""] if preset.description else [] ),
        f"Base model `{preset.model}`, template `{preset.template}`, dataset `{preset.dataset}`. "
        f"Eval: OpenCompass {eval_desc}.",
        "",
        "Trainable params are counted in each adapter's adapter_model.safetensors (saved frozen buffers excluded); "
        "`train loop` is the trainer's train_runtime, `train wall` the whole `llamafactory-cli train` process "
        "(start-up and saving included). Scores are accuracy in %.",
        "",
        table,
        *([f"Requested but skipped by the eval config, so not in the table: {', '.join(skipped)}.", ""]
          if skipped else []),
        "Loss curves: curves.png (LM loss = lm_loss, the logged loss without moe_aux_loss; aux loss as logged).",
        "",
    ]
    (out_dir / "comparison.md").write_text("\n".join(notes))
    (out_dir / "comparison.json").write_text(json.dumps(
        {"preset": str(preset.path), "header": header, "rows": rows, "skipped_tasks": skipped, "runs": outcomes},
        indent=2, default=str))
    plot_curves(outcomes, out_dir / "curves.png")
    return table
