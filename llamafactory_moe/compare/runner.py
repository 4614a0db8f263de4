"""Running a comparison: per run ``llamafactory-cli train`` and ``opencompass`` as subprocesses (:class:`StepFailed`
when one fails), the parameter count and the summary scores, ``DONE.json`` and resuming from it, and the
``compare`` command's entry point.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import yaml

from ..errors import MoeError
from .preset import (Preset, PresetError, Run, _fingerprint, eval_env, load_preset, resolve_dataset_dir,
                     resolve_model, train_config)
from .report import _fmt, write_outputs

DONE_FILE = "DONE.json"


# ---------------------------------------------------------------------------------------------------------------------
# Measuring one run
# ---------------------------------------------------------------------------------------------------------------------

def _buffer_names() -> set[str]:
    """Names of saved-but-frozen adapter tensors of our methods (e.g. ``goat_A_init``, ``smora_bias``)."""
    from ..core.peft_types import METHODS, register_all_methods

    register_all_methods()
    return {name for spec in METHODS.values() for name in getattr(spec.model_cls.tuner_layer_cls, "buffer_names", ())}


def trainable_parameters(adapter_dir: str | os.PathLike) -> dict:
    """Count the adapter's trained parameters from its ``adapter_model.safetensors`` (shape metadata only)."""
    from safetensors import safe_open

    buffers = _buffer_names()
    trainable = frozen = 0
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), "pt") as handle:
        for key in handle.keys():
            numel = math.prod(handle.get_slice(key).get_shape())
            # peft saves e.g. `...q_proj.goat_A_init` (the adapter name is stripped on save).
            if key.rsplit(".", 1)[-1] in buffers:
                frozen += numel
            else:
                trainable += numel
    return {"trainable": trainable, "saved_buffers": frozen}


def _llamafactory_trainable(log_text: str) -> int | None:
    """LLaMA-Factory's own count, printed as `trainable params: 20,480 || all params: ...` (a cross-check)."""
    for line in log_text.splitlines():
        if "trainable params:" in line:
            return int(line.split("trainable params:")[1].split("||")[0].strip().replace(",", ""))
    return None


def read_summary(eval_dir: Path, column: str) -> tuple[dict[str, float | None], float | None]:
    """({task row: score or None}, average) from the newest OpenCompass summary CSV under ``eval_dir/out``."""
    files = sorted((eval_dir / "out").glob("*/summary/summary_*.csv"))
    if not files:
        raise FileNotFoundError(f"no summary CSV under {eval_dir / 'out'}")
    with files[-1].open() as handle:
        rows = list(csv.reader(handle))
    header = rows[0]
    if column not in header:
        raise ValueError(f"{files[-1]} has no column {column!r}; columns: {header}")
    col = header.index(column)

    def number(cell: str) -> float | None:
        try:
            return float(cell)
        except ValueError:
            return None  # OpenCompass writes `-` for a task without a result

    scores, average = {}, None
    for row in rows[1:]:
        if row[2] == "naive_average":
            if row[0].endswith("-avg") and average is None:
                average = number(row[col])
        elif row[0] not in scores:
            # A task listed twice (choice mode: acc_norm and acc) has its headline metric first, which the average uses.
            scores[row[0]] = number(row[col])
    if average is None and scores and all(v is not None for v in scores.values()):
        average = sum(scores.values()) / len(scores)
    return scores, average


class StepFailed(MoeError, RuntimeError):
    def __init__(self, step: str, log: Path, detail: str):
        super().__init__(f"{step} failed: {detail} (log: {log})")
        self.step, self.log, self.detail = step, log, detail


def _child_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DISABLE_VERSION_CHECK="1", LLAMAFACTORY_VERBOSITY="INFO")
    env.update(extra or {})
    return env


def _run_logged(argv: list[str], log: Path, cwd: Path, env: dict, step: str) -> float:
    start = time.perf_counter()
    with log.open("w") as handle:
        handle.write(f"$ {' '.join(argv)}\n")
        handle.flush()
        proc = subprocess.run(argv, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise StepFailed(step, log, f"exit {proc.returncode}; last line: {tail[0][:300]}")
    return seconds


def _executable(name: str) -> str:
    """The console script next to this interpreter (the one with llamafactory_moe installed), else from PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else (shutil.which(name) or name)


def train_run(run: Run, run_dir: Path, fingerprint: str, config: dict, env: dict) -> dict:
    """Step 1 and 2: a clean run folder, ``llamafactory-cli train``, the parameter count. Returns a partial outcome."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # leftovers of an interrupted or failed attempt: start clean
    run_dir.mkdir(parents=True)
    (run_dir / "train.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    train_log = run_dir / "train.log"
    wall = _run_logged([_executable("llamafactory-cli"), "train", str(run_dir / "train.yaml")], train_log, run_dir,
                       _child_env(), "train")
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_model.safetensors").is_file():
        raise StepFailed("train", train_log, f"no adapter_model.safetensors in {adapter}")
    counts = trainable_parameters(adapter)
    results_file = adapter / "train_results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    return dict(
        name=run.name, finetuning_type=run.finetuning_type, fingerprint=fingerprint,
        trainable_params=counts["trainable"], saved_buffer_params=counts["saved_buffers"],
        llamafactory_trainable_params=_llamafactory_trainable(train_log.read_text(errors="replace")),
        train_runtime_s=results.get("train_runtime"), train_wall_s=round(wall, 2),
        train_loss=results.get("train_loss"), adapter=str(adapter), train_log=str(train_log),
        trainer_log=str(adapter / "trainer_log.jsonl"), train_config=config, eval_env=env,
    )


def evaluate_run(preset: Preset, run_dir: Path, outcome: dict) -> dict:
    """Step 3 and 4: ``opencompass`` on the trained adapter, the summary scores, ``DONE.json``."""
    eval_dir = run_dir / "eval"
    eval_dir.mkdir()
    eval_log = run_dir / "eval.log"
    # cwd = eval_dir: OpenCompass writes ./tmp, ./.cache and ./icl_inference_output into the working directory.
    # --debug runs every task in this process and exits non-zero if one fails (without it OpenCompass exits 0).
    argv = [_executable("opencompass"), preset.eval["config"], "--debug",
            "-w", str(eval_dir / "out")]
    eval_seconds = _run_logged(argv, eval_log, eval_dir, _child_env(outcome["eval_env"]), "eval")
    try:
        scores, average = read_summary(eval_dir, outcome["name"])
    except (FileNotFoundError, ValueError) as exc:
        raise StepFailed("eval", eval_log, str(exc)) from exc
    outcome = {**outcome, "eval_wall_s": round(eval_seconds, 2), "eval_log": str(eval_log), "scores": scores,
               "average": average}
    (run_dir / DONE_FILE).write_text(json.dumps(outcome, indent=2, default=str))
    return outcome


# ---------------------------------------------------------------------------------------------------------------------
# The whole comparison
# ---------------------------------------------------------------------------------------------------------------------

def run_compare(preset: Preset, out_dir: Path, *, only: list[str] | None = None, fail_fast: bool = False,
                overlap_eval: bool = False) -> int:
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = preset.runs
    if only:
        names = [r.name for r in runs]
        unknown = [n for n in only if n not in names]
        if unknown:
            raise PresetError(f"--runs {unknown} not in {preset.path}; its runs are {names}")
        runs = [r for r in runs if r.name in only]
    model = resolve_model(preset)
    dataset_dir = resolve_dataset_dir(preset, out_dir)
    print(f"compare: {len(runs)} run(s) of {preset.path} -> {out_dir}\n  base model: {model}", flush=True)

    # One slot per run, filled in preset order whatever order the steps finish in.
    outcomes: list[dict | None] = [None] * len(runs)
    failures = 0
    # --overlap-eval: one background thread runs run i's `opencompass` while the main thread trains run i + 1. Both
    # are subprocesses, so the thread only waits; on tiny models both are start-up bound, so the overlap saves time.
    pool = ThreadPoolExecutor(max_workers=1) if overlap_eval else None
    pending: list[tuple[int, str, Future]] = []

    def failed(slot: int, run: Run, prefix: str, exc: StepFailed) -> None:
        nonlocal failures
        failures += 1
        print(f"{prefix}: FAILED at {exc.step}: {exc.detail}\n    log: {exc.log}", file=sys.stderr, flush=True)
        outcomes[slot] = dict(name=run.name, finetuning_type=run.finetuning_type,
                              failed=dict(step=exc.step, log=str(exc.log), detail=exc.detail))

    def finished(slot: int, prefix: str, outcome: dict) -> None:
        outcomes[slot] = outcome
        print(f"{prefix}: done: {outcome['trainable_params']} trainable params, train {outcome['train_wall_s']:.1f} s, "
              f"eval {outcome['eval_wall_s']:.1f} s, average {_fmt(outcome['average'])}", flush=True)

    def collect(wait_all: bool) -> None:
        for item in list(pending):
            slot, prefix, future = item
            if wait_all or future.done():
                pending.remove(item)
                try:
                    finished(slot, prefix, future.result())
                except StepFailed as exc:
                    failed(slot, runs[slot], prefix, exc)

    for slot, run in enumerate(runs):
        run_dir = out_dir / run.name
        config = train_config(preset, run, model, dataset_dir, run_dir)
        env = eval_env(preset, model, run_dir / "adapter", run.name)
        fingerprint = _fingerprint(config, env, preset)
        done = run_dir / DONE_FILE
        prefix = f"[{slot + 1}/{len(runs)}] {run.name} ({run.finetuning_type})"
        if done.is_file():
            previous = json.loads(done.read_text())
            if previous.get("fingerprint") == fingerprint:
                print(f"{prefix}: skipped, already done ({done})", flush=True)
                outcomes[slot] = previous
                continue
            print(f"{prefix}: settings changed since {done} was written; redoing it", flush=True)
        print(f"{prefix}: training (log {run_dir / 'train.log'}) ...", flush=True)
        try:
            trained = train_run(run, run_dir, fingerprint, config, env)
            print(f"{prefix}: evaluating (log {run_dir / 'eval.log'}) ...", flush=True)
            if pool is None:
                finished(slot, prefix, evaluate_run(preset, run_dir, trained))
            else:
                pending.append((slot, prefix, pool.submit(evaluate_run, preset, run_dir, trained)))
                collect(wait_all=False)
        except StepFailed as exc:
            failed(slot, run, prefix, exc)
        if failures and fail_fast:
            break
    collect(wait_all=True)
    if pool is not None:
        pool.shutdown()
    if failures and fail_fast:
        print("compare: stopped at the first failure (--fail-fast)", file=sys.stderr)
    outcomes = [o for o in outcomes if o is not None]

    table = write_outputs(preset, out_dir, outcomes)
    print(f"\n{table}\nwrote {out_dir / 'comparison.md'}, {out_dir / 'comparison.json'}, {out_dir / 'curves.png'}")
    if failures:
        print(f"compare: {failures} run(s) failed; rerun the same command to redo only those", file=sys.stderr)
        return 1
    return 0


def run(args) -> int:
    """``llamafactory-moe compare``; a bad preset raises ``PresetError``, printed as one line by the CLI."""
    preset = load_preset(args.preset)
    out_dir = Path(args.output_dir or preset.output_dir or Path("saves") / "compare" / preset.path.stem)
    only = [n.strip() for n in args.runs.split(",") if n.strip()] if args.runs else None
    return run_compare(preset, out_dir, only=only, fail_fast=args.fail_fast,
                       overlap_eval=getattr(args, "overlap_eval", False))


def add_parser(sub) -> None:
    parser = sub.add_parser("compare", help="train several methods on the same data with llamafactory-cli, evaluate "
                                            "each with OpenCompass, write one table and a loss plot (resumable)")
    parser.add_argument("preset",
                        help="preset yaml, e.g. configs/compare/tiny.yaml (format: configs/compare/README.md)")
    parser.add_argument("--output-dir", default=None,
                        help="where runs and results go "
                             "(default: the preset's output_dir, else saves/compare/<preset>)")
    parser.add_argument("--runs", default=None, help="comma-separated subset of the preset's run names")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failing run")
    parser.add_argument("--overlap-eval", action="store_true",
                        help="evaluate each run while the next one trains (faster for tiny models; on real models "
                             "both compete for the same cores)")
    parser.set_defaults(func=run)
