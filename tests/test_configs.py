"""Every shipped LLaMA-Factory config parses with the stock parser (our keys included), so a renamed key or an
invalid value in a config fails here rather than on a user's GPU. `configs/compare/` holds compare presets, not
LLaMA-Factory configs: there each run's merged training config (what `llamafactory-moe compare` hands to
`llamafactory-cli train`) is parsed instead."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
CONFIGS = sorted(p for p in CONFIG_ROOT.rglob("*.yaml") if p.parent.name != "compare")
PRESETS = sorted((CONFIG_ROOT / "compare").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(p.parents[1])) for p in CONFIGS])
def test_config_parses(path, tmp_path):
    _assert_parses(yaml.safe_load(path.read_text()), tmp_path)


def _preset_runs():
    from llamafactory_moe.compare import load_preset

    return [(preset, load_preset(preset), run) for preset in PRESETS for run in load_preset(preset).runs]


@pytest.mark.parametrize("path, preset, run", _preset_runs(),
                         ids=[f"{p.name}:{r.name}" for p, _, r in _preset_runs()])
def test_compare_run_config_parses(path, preset, run, tmp_path):
    from llamafactory_moe.compare import train_config

    _assert_parses(train_config(preset, run, "HuggingFaceTB/SmolLM2-135M-Instruct", str(tmp_path), tmp_path), tmp_path)


def _assert_parses(config: dict, tmp_path) -> None:
    from llamafactory.hparams import get_train_args

    method = config.get("finetuning_type", "lora")
    config["output_dir"] = str(tmp_path / "out")
    config.pop("deepspeed", None)  # DeepSpeed needs a distributed launch; its json is tested separately
    for key in ("bf16", "fp16", "pure_bf16"):  # mixed precision needs a GPU on some setups; parse-only here
        config.pop(key, None)
    _, _, _, finetuning_args, _ = get_train_args(config)
    if method == "lora":
        assert finetuning_args.finetuning_type == "lora"
        return
    assert finetuning_args.moe_method == method
    assert finetuning_args.moe_peft_config is not None


# ---------------------------------------------------------------------------------------------------------------------
# Every dataset a shipped config names resolves through LLaMA-Factory's own dataset_info.json mechanism
# ---------------------------------------------------------------------------------------------------------------------

def _resolve_datasets(config: dict, cwd: Path, monkeypatch, tmp_path) -> list[tuple[str, object, str]]:
    """Parse ``config`` with LLaMA-Factory's parser from ``cwd`` and resolve its datasets with ``get_dataset_list``
    (no download). Returns (name, DatasetAttr, dataset_dir) for the train and eval datasets."""
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.hparams import get_train_args

    monkeypatch.chdir(cwd)
    config = {**config, "output_dir": str(tmp_path / "out")}
    for key in ("deepspeed", "bf16", "fp16", "pure_bf16"):  # see _assert_parses
        config.pop(key, None)
    _, data_args, _, _, _ = get_train_args(config)
    resolved = []
    for names in (data_args.dataset, data_args.eval_dataset):
        for attr in get_dataset_list(names, data_args.dataset_dir):
            resolved.append((attr.dataset_name, attr, data_args.dataset_dir))
    return resolved


def _check_sources(path: Path, resolved, cwd: Path) -> None:
    """Hub entries name a repository; a local file exists, or the README of its dataset_dir says where it comes from."""
    assert resolved, f"{path}: names no dataset"
    for name, attr, dataset_dir in resolved:
        if attr.load_from in ("hf_hub", "ms_hub", "om_hub"):
            assert "/" in name, f"{path}: hub entry {name!r} is not an owner/name repository id"
            continue
        assert attr.load_from == "file", f"{path}: {name} loads from {attr.load_from}"
        local = cwd / dataset_dir / name
        if local.exists():
            continue
        readme = cwd / dataset_dir / "README.md"
        assert readme.is_file() and name in readme.read_text(), (
            f"{path}: {local} does not exist and {readme} does not say where `{name}` comes from")


def _llamafactory_configs():
    return [p for p in CONFIGS if "stage" in yaml.safe_load(p.read_text())]


@pytest.mark.parametrize("path", _llamafactory_configs(),
                         ids=[str(p.relative_to(CONFIG_ROOT)) for p in _llamafactory_configs()])
def test_config_datasets_resolve_from_the_repository_root(path, monkeypatch, tmp_path):
    config = yaml.safe_load(path.read_text())
    _check_sources(path, _resolve_datasets(config, CONFIG_ROOT.parent, monkeypatch, tmp_path), CONFIG_ROOT.parent)


@pytest.fixture(scope="module")
def copied_project(tmp_path_factory) -> Path:
    """What a wheel user gets from `llamafactory-moe copy-configs` in a folder of their own."""
    from llamafactory_moe.project_files import copy_configs

    destination = tmp_path_factory.mktemp("user_folder")
    copy_configs(destination)
    return destination


@pytest.mark.parametrize("path", _llamafactory_configs(),
                         ids=[str(p.relative_to(CONFIG_ROOT)) for p in _llamafactory_configs()])
def test_config_datasets_resolve_from_a_copied_folder(path, copied_project, monkeypatch, tmp_path):
    copied = copied_project / path.relative_to(CONFIG_ROOT.parent)
    assert copied.read_text() == path.read_text()
    config = yaml.safe_load(copied.read_text())
    _check_sources(copied, _resolve_datasets(config, copied_project, monkeypatch, tmp_path), copied_project)


def test_dataset_resolution_fails_without_the_data_folder(monkeypatch, tmp_path):
    """Negative control: from a folder without data/, the SMoRA config fails as it did before data/ was shipped."""
    config = yaml.safe_load((CONFIG_ROOT / "llama3_smora.yaml").read_text())
    with pytest.raises(ValueError, match=r"Cannot open data/dataset_info\.json"):
        _resolve_datasets(config, tmp_path, monkeypatch, tmp_path)


def test_every_dataset_definition_is_used_or_documented():
    """Each shipped dataset_info.json entry is named by a config or by data/README.md (no stale definitions)."""
    import json

    data_root = CONFIG_ROOT.parent / "data"
    named = {name.strip() for p in CONFIGS for name in
             str(yaml.safe_load(p.read_text()).get("dataset", "")).split(",") if name.strip()}
    named |= {name.strip() for p in PRESETS for name in str(yaml.safe_load(p.read_text())["dataset"]).split(",")}
    for info in data_root.rglob("dataset_info.json"):
        readme = (info.parent / "README.md").read_text()
        for name in json.loads(info.read_text()):
            assert name in named or f"`{name}`" in readme, f"{info}: `{name}` is neither used nor documented"


@pytest.mark.slow
def test_headline_config_reaches_the_hub_download(tiny_model, tmp_path):
    """`llamafactory-cli train configs/llama3_smora.yaml` from the repository root, as the README says (model swapped
    for the tiny one, 1 step): offline, it gets past dataset_info.json to the hub download of the paper's data and
    stops there with the datasets library's own message."""
    import subprocess

    from tests.conftest import BASE_ENV

    result = subprocess.run(
        ["llamafactory-cli", "train", "configs/llama3_smora.yaml", f"model_name_or_path={tiny_model}", "max_steps=1",
         "bf16=false", f"output_dir={tmp_path / 'out'}", "preprocessing_num_workers=1"],
        cwd=CONFIG_ROOT.parent, env=BASE_ENV, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Couldn't reach 'iamtarun/python_code_instructions_18k_alpaca' on the Hub" in output, output[-3000:]
    assert "dataset_info.json" not in output.split("Couldn't reach")[0].split("Traceback")[-1]


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_compare_preset_datasets_resolve(path, monkeypatch, tmp_path):
    """A compare preset's data as `llamafactory-moe compare` hands it to LLaMA-Factory, from the repository root (the
    folder its relative paths are written for); every file it names exists."""
    from llamafactory.data.parser import get_dataset_list

    from llamafactory_moe.compare import load_preset, resolve_dataset_dir
    from tests.conftest import SHARED_DATA

    preset = load_preset(path)
    if "shared" in str(preset.dataset_dir) and not SHARED_DATA.is_dir():
        pytest.skip(f"{path.name} reads ../shared/data, which is not beside this checkout")
    monkeypatch.chdir(CONFIG_ROOT.parent)
    dataset_dir = resolve_dataset_dir(preset, tmp_path)
    attrs = get_dataset_list(preset.dataset.split(","), dataset_dir)
    assert attrs and all(attr.load_from == "file" for attr in attrs)
    for attr in attrs:
        assert (Path(dataset_dir) / attr.dataset_name).is_file(), attr.dataset_name
