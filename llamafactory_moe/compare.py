"""``llamafactory-moe compare <preset.yaml>``: train several methods on the same data, evaluate each, one table.

For every run of the preset, in order:

1. write the merged LLaMA-Factory yaml to ``<out>/<name>/train.yaml`` and run the stock ``llamafactory-cli train`` on
   it (a real subprocess, timed; log in ``<out>/<name>/train.log``);
2. count the trainable parameters in the saved ``adapter_model.safetensors`` (method buffers such as GOAT's initial
   SVD slices or SMoRA's balancing bias are saved there too but are not trained, so they are left out);
3. run ``opencompass eval_configs/<config> --debug`` with the ``MOE_*`` environment variables pointing at the base
   model and the adapter (work dir ``<out>/<name>/eval``, log ``<out>/<name>/eval.log``) and read its summary CSV;
4. write ``<out>/<name>/DONE.json`` with the results.

A run whose ``DONE.json`` exists and was made from the same settings is skipped, so an interrupted comparison resumes
where it stopped; a run directory without ``DONE.json`` (interrupted or failed) is deleted and redone. A failing run
is reported (run, step, log) and the others still run, unless ``--fail-fast``. At the end ``comparison.md``,
``comparison.json`` and ``curves.png`` (LM loss and aux loss per method, read from each ``trainer_log.jsonl``) are
written from every ``DONE.json`` and the table is printed.

The preset format is documented in ``configs/compare/README.md``; :func:`load_preset` validates it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .project_files import project_folder

__all__ = ["Preset", "PresetError", "load_preset", "run_compare", "trainable_parameters"]

TOP_LEVEL_KEYS = {
    "description": "free text, shown at the top of comparison.md",
    "model": "base model directory, or `@tiny_llama` / `@smollm2` (built offline by llamafactory_moe)",
    "tiny_llama": "with model `@tiny_llama`: build arguments of llamafactory_moe.testing.tiny_llama_path",
    "template": "LLaMA-Factory chat template (llama3, smollm2, alpaca, ...)",
    "dataset": "LLaMA-Factory dataset name(s), comma-separated",
    "dataset_dir": "folder of the data files (and of dataset_info.json unless `dataset_info` is given); "
                   "`@packaged` = the packaged moe_demo data",
    "dataset_info": "optional dataset_info.json whose file names are relative to `dataset_dir`",
    "train": "LLaMA-Factory yaml keys shared by every run",
    "runs": "list of {name, finetuning_type, <method keys>}",
    "eval": "OpenCompass settings: config, tasks, limit, mode, data_dir, batch_size, env",
    "output_dir": "default output folder (the --output-dir option wins)",
}
REQUIRED_KEYS = ("model", "template", "dataset", "dataset_dir", "runs", "eval")
EVAL_KEYS = {
    "config": "file name in the shipped eval_configs/ (default commonsense_eval.py), or a path to a config",
    "tasks": "list (or comma string) of tasks -> MOE_EVAL_TASKS",
    "limit": "first N examples per task -> MOE_EVAL_LIMIT",
    "mode": "gen | ppl | choice (whatever the eval config accepts) -> MOE_EVAL_MODE",
    "data_dir": "data root holding commonsense/<task>/test.json -> MOE_EVAL_DATA (default: $MOE_EVAL_DATA, else "
                "../shared/data next to the checkout)",
    "batch_size": "inference batch size -> MOE_EVAL_BATCH_SIZE",
    "env": "any other MOE_* variable, e.g. {MOE_CHAT_TEMPLATE: 1}",
}
# Set by the preset's top level or by compare itself; a run or `train` block setting them would be silently ignored.
RESERVED_TRAIN_KEYS = ("model_name_or_path", "template", "dataset", "dataset_dir", "output_dir", "finetuning_type")
DONE_FILE = "DONE.json"


class PresetError(ValueError):
    """A preset that cannot run: the message names the key, the value and what is allowed."""


@dataclass
class Run:
    name: str
    finetuning_type: str
    keys: dict  # the run's own LLaMA-Factory keys (they override the preset's `train` block)


@dataclass
class Preset:
    path: Path
    description: str
    model: str
    tiny_llama: dict
    template: str
    dataset: str
    dataset_dir: str
    dataset_info: str | None
    train: dict
    runs: list[Run]
    eval: dict
    output_dir: str | None
    raw: dict = field(repr=False, default_factory=dict)


def _known_methods() -> list[str]:
    from .core.peft_types import METHODS, register_all_methods

    register_all_methods()
    return ["lora", *METHODS]


def load_preset(path: str | os.PathLike) -> Preset:
    """Read and validate a preset; every problem raises :class:`PresetError` naming the key."""
    path = Path(path)
    if not path.is_file():
        raise PresetError(f"preset {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PresetError(f"preset {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise PresetError(f"preset {path} must be a YAML mapping of {sorted(TOP_LEVEL_KEYS)}; got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise PresetError(f"{path}: unknown key(s) {unknown}; allowed top-level keys: {sorted(TOP_LEVEL_KEYS)} "
                          "(LLaMA-Factory training keys go under `train:` or inside a run)")
    missing = [key for key in REQUIRED_KEYS if raw.get(key) in (None, "", [])]
    if missing:
        raise PresetError(f"{path}: missing required key `{missing[0]}` ({TOP_LEVEL_KEYS[missing[0]]})")

    train = raw.get("train") or {}
    if not isinstance(train, dict):
        raise PresetError(f"{path}: `train` must be a mapping of LLaMA-Factory keys; got {train!r}")
    for key in RESERVED_TRAIN_KEYS:
        if key in train:
            raise PresetError(f"{path}: `train.{key}` is set by compare (top-level `model`/`template`/`dataset`/"
                              f"`dataset_dir`, or per run); remove it from `train`")

    runs_raw = raw["runs"]
    if not isinstance(runs_raw, list):
        raise PresetError(f"{path}: `runs` must be a list of {{name, finetuning_type, ...}}; got {runs_raw!r}")
    methods = _known_methods()
    runs, seen = [], set()
    for index, item in enumerate(runs_raw):
        where = f"{path}: `runs[{index}]`"
        if not isinstance(item, dict):
            raise PresetError(f"{where} must be a mapping with `name` and `finetuning_type`; got {item!r}")
        for key in ("name", "finetuning_type"):
            if not item.get(key):
                raise PresetError(f"{where} is missing `{key}`")
        name = str(item["name"])
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise PresetError(f"{where}: `name` ({name!r}) must be letters, digits, '-', '_' or '.' "
                              "(it names the run's folder)")
        if name in seen:
            raise PresetError(f"{where}: `name` {name!r} is used twice; run names must be unique")
        seen.add(name)
        method = str(item["finetuning_type"])
        if method not in methods:
            raise PresetError(f"{where}: unknown `finetuning_type` {method!r}; allowed: {methods}")
        keys = {k: v for k, v in item.items() if k not in ("name", "finetuning_type")}
        for key in RESERVED_TRAIN_KEYS:
            if key in keys:
                raise PresetError(f"{where}: `{key}` is set by compare; remove it from the run")
        runs.append(Run(name=name, finetuning_type=method, keys=keys))

    evaluation = raw["eval"]
    if not isinstance(evaluation, dict):
        raise PresetError(f"{path}: `eval` must be a mapping of {sorted(EVAL_KEYS)}; got {evaluation!r}")
    unknown = sorted(set(evaluation) - set(EVAL_KEYS))
    if unknown:
        raise PresetError(f"{path}: unknown `eval` key(s) {unknown}; allowed: {sorted(EVAL_KEYS)}")
    config = str(evaluation.get("config", "commonsense_eval.py"))
    # A name is one of the shipped eval_configs/ (wheel or checkout: llamafactory_moe.project_files); a path is used as
    # is.
    shipped = project_folder("eval_configs")
    candidates = (Path(config).expanduser(), shipped / config)
    config_path = next((c for c in candidates if c.is_file()), None)
    if config_path is None:
        raise PresetError(f"{path}: `eval.config` ({config!r}) is not a file in {shipped} nor a path to one; name a "
                          "shipped config (e.g. commonsense_eval.py) or give the path of your own")
    if "limit" in evaluation and not (isinstance(evaluation["limit"], int) and evaluation["limit"] >= 1):
        raise PresetError(f"{path}: `eval.limit` must be an integer >= 1 (or absent for all examples); "
                          f"got {evaluation['limit']!r}")
    if not isinstance(evaluation.get("env", {}), dict):
        raise PresetError(f"{path}: `eval.env` must be a mapping of MOE_* variables; got {evaluation['env']!r}")

    tiny = raw.get("tiny_llama") or {}
    if tiny and raw["model"] != "@tiny_llama":
        raise PresetError(f"{path}: `tiny_llama` is only read with `model: \"@tiny_llama\"`; "
                          f"got model {raw['model']!r}")
    return Preset(path=path, description=str(raw.get("description", "")).strip(), model=str(raw["model"]),
                  tiny_llama=dict(tiny), template=str(raw["template"]), dataset=str(raw["dataset"]),
                  dataset_dir=str(raw["dataset_dir"]), dataset_info=raw.get("dataset_info"), train=dict(train),
                  runs=runs, eval={**evaluation, "config": str(config_path.resolve())},
                  output_dir=raw.get("output_dir"), raw=raw)


# ---------------------------------------------------------------------------------------------------------------------
# Resolving the preset into concrete paths
# ---------------------------------------------------------------------------------------------------------------------

def resolve_model(preset: Preset) -> str:
    """``@tiny_llama`` and ``@smollm2`` are built offline (and cached) by llamafactory_moe; anything else is a path."""
    if preset.model == "@tiny_llama":
        from .testing import tiny_llama_path

        return str(tiny_llama_path(**preset.tiny_llama))
    if preset.model == "@smollm2":
        from .models import prepare_smollm2

        return str(prepare_smollm2())
    model = Path(preset.model).expanduser()
    if not (model / "config.json").is_file():
        raise PresetError(f"{preset.path}: `model` ({preset.model}) has no config.json; give a Hugging Face model "
                          "directory, `@tiny_llama` or `@smollm2` (nothing is downloaded from a hub)")
    return str(model.resolve())


def resolve_dataset_dir(preset: Preset, out_dir: Path) -> str:
    """The ``dataset_dir`` LLaMA-Factory gets. With ``dataset_info``, a dataset_info.json with absolute file names is
    written under ``out_dir`` (LLaMA-Factory joins dataset_dir and file_name, and an absolute file_name wins), so
    read-only data folders such as ../shared/data/commonsense need no copy or symlink."""
    if preset.dataset_dir == "@packaged":
        from .data import demo_data_dir

        data_dir = demo_data_dir()
    else:
        data_dir = Path(preset.dataset_dir).expanduser().resolve()
    if not data_dir.is_dir():
        raise PresetError(f"{preset.path}: `dataset_dir` ({data_dir}) is not a directory")
    if preset.dataset_info is None:
        if not (data_dir / "dataset_info.json").is_file():
            raise PresetError(f"{preset.path}: `dataset_dir` ({data_dir}) has no dataset_info.json; add one there or "
                              "set `dataset_info` to a dataset_info.json whose file names are relative to it")
        return str(data_dir)
    info_path = Path(preset.dataset_info).expanduser()
    if not info_path.is_file():
        raise PresetError(f"{preset.path}: `dataset_info` ({info_path}) does not exist")
    info = json.loads(info_path.read_text())
    wanted = [name.strip() for name in preset.dataset.split(",") if name.strip()]
    for name in wanted:
        if name not in info:
            raise PresetError(f"{preset.path}: `dataset` {name!r} is not in {info_path}; it defines {sorted(info)}")
        file_path = data_dir / info[name]["file_name"]
        if not file_path.exists():
            raise PresetError(f"{preset.path}: dataset {name!r} expects {file_path}, which is missing")
    resolved = {name: {**entry, "file_name": str(data_dir / entry["file_name"])} for name, entry in info.items()}
    target = out_dir / "data"
    target.mkdir(parents=True, exist_ok=True)
    (target / "dataset_info.json").write_text(json.dumps(resolved, indent=2))
    return str(target)


def train_config(preset: Preset, run: Run, model: str, dataset_dir: str, run_dir: Path) -> dict:
    """The run's full LLaMA-Factory yaml: preset `train` keys, then the run's own keys, then the fixed ones."""
    config = dict(model_name_or_path=model, stage="sft", do_train=True, finetuning_type=run.finetuning_type,
                  template=preset.template, dataset=preset.dataset, dataset_dir=dataset_dir)
    config.update(preset.train)
    config.update(run.keys)
    config.update(output_dir=str(run_dir / "adapter"), overwrite_output_dir=True, report_to="none")
    return config


def eval_env(preset: Preset, model: str, adapter: Path | None, name: str) -> dict:
    settings = preset.eval
    env = {"MOE_BASE_MODEL": model, "MOE_MODEL_ABBR": name, "MOE_NUM_GPUS": "0"}
    if adapter is not None:
        env["MOE_ADAPTER"] = str(adapter)
    tasks = settings.get("tasks")
    if tasks:
        env["MOE_EVAL_TASKS"] = tasks if isinstance(tasks, str) else ",".join(map(str, tasks))
    for key, var in (("limit", "MOE_EVAL_LIMIT"), ("mode", "MOE_EVAL_MODE"), ("batch_size", "MOE_EVAL_BATCH_SIZE")):
        if settings.get(key) is not None:
            env[var] = str(settings[key])
    # Other MOE_* variables of the caller are not passed on (_child_env), but a data root set for the shell is the
    # natural default: an installed wheel has no ../shared/data beside its eval configs.
    data_dir = settings.get("data_dir") or os.environ.get("MOE_EVAL_DATA")
    if data_dir:
        env["MOE_EVAL_DATA"] = str(Path(data_dir).expanduser().resolve())
    env.update({str(k): str(v) for k, v in (settings.get("env") or {}).items()})
    return env


def _fingerprint(config: dict, env: dict, preset: Preset) -> str:
    """What a finished run was made from; a DONE.json with another fingerprint is stale and is redone."""
    blob = json.dumps({"train": config, "eval_env": env, "eval_config": preset.eval["config"]}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# Measuring one run
# ---------------------------------------------------------------------------------------------------------------------

def _buffer_names() -> set[str]:
    """Names of saved-but-frozen adapter tensors of our methods (e.g. ``goat_A_init``, ``smora_bias``)."""
    from .core.peft_types import METHODS, register_all_methods

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


class StepFailed(RuntimeError):
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
            rows.append([outcome["name"], outcome["finetuning_type"], f"failed at {step}: see {outcome['failed']['log']}",
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


def main_from_args(args) -> int:
    try:
        preset = load_preset(args.preset)
        out_dir = Path(args.output_dir or preset.output_dir or Path("saves") / "compare" / preset.path.stem)
        only = [n.strip() for n in args.runs.split(",") if n.strip()] if args.runs else None
        return run_compare(preset, out_dir, only=only, fail_fast=args.fail_fast,
                           overlap_eval=getattr(args, "overlap_eval", False))
    except PresetError as exc:
        print(f"llamafactory-moe compare: {exc}", file=sys.stderr)
        return 2
