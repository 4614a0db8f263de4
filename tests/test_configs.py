"""Every shipped LLaMA-Factory config parses with the stock parser (our keys included), so a renamed key or an
invalid value in a config fails here rather than on a user's GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llamafactory_moe.methods import IMPLEMENTED

CONFIGS = sorted(p for p in (Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(p.parents[1])) for p in CONFIGS])
def test_config_parses(path, tmp_path):
    from llamafactory.hparams import get_train_args

    config = yaml.safe_load(path.read_text())
    method = config.get("finetuning_type", "lora")
    if method not in IMPLEMENTED and method != "lora":
        pytest.skip(f"{method} not implemented yet")
    config["output_dir"] = str(tmp_path / "out")
    config.pop("deepspeed", None)  # DeepSpeed needs a distributed launch; its json is tested separately
    for key in ("bf16", "fp16", "pure_bf16"):  # mixed precision needs a GPU on some setups; parse-only here
        config.pop(key, None)
    _, _, _, finetuning_args, _ = get_train_args(config)
    assert finetuning_args.moe_method == method
    assert finetuning_args.moe_peft_config is not None
