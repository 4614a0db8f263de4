"""The preset of ``llamafactory-moe compare``: loading and validation (:class:`PresetError`), and resolving it into
the concrete model path, dataset folder, per-run LLaMA-Factory config and OpenCompass environment.

The preset format is documented in ``configs/compare/README.md``; :func:`load_preset` validates it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import MoeError
from ..project_files import project_folder

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


class PresetError(MoeError, ValueError):
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
    from ..core.peft_types import METHODS, register_all_methods

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
        from ..testing import tiny_llama_path

        return str(tiny_llama_path(**preset.tiny_llama))
    if preset.model == "@smollm2":
        from ..models import prepare_smollm2

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
        from ..data import demo_data_dir

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
