"""Every shipped LLaMA-Factory config parses with the stock parser (our keys included), so a renamed key or an
invalid value in a config fails here rather than on a user's GPU. `configs/compare/` holds compare presets, not
LLaMA-Factory configs: there each run's merged training config (what `llamafactory-moe compare` hands to
`llamafactory-cli train`) is parsed instead."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llamafactory_moe.methods import IMPLEMENTED

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
    if method not in IMPLEMENTED and method != "lora":
        pytest.skip(f"{method} not implemented yet")
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
