"""Invalid configurations fail during argument parsing — before any model loads — naming key, value and what is allowed.

`model_name_or_path` points to a directory that does not exist: if validation did not stop the run first, loading the
model would fail with a different error, so each assertion on our message proves the check ran before model loading.
"""

from __future__ import annotations

import pytest

from llamafactory_moe.core.errors import MoeConfigError
from tests.conftest import run_cli

MISSING_MODEL = "/nonexistent/model-that-must-not-be-loaded"

BASE = dict(model_name_or_path=MISSING_MODEL, stage="sft", do_train=True, finetuning_type="moelora", dataset="tiny",
            template="llama3", output_dir="/tmp/llamafactory_moe_bad_config_out", report_to="none", lora_rank=4)

# (case id, overrides, key the message must name, words the message must contain)
BAD_CONFIGS = [
    ("unknown-method", dict(finetuning_type="smroa"), "finetuning_type", "did you mean `smora`"),
    ("top-k-above-experts", dict(moe_num_experts=2, moe_top_k=3), "moe_top_k", "<= `moe_num_experts` (2)"),
    ("zero-experts", dict(moe_num_experts=0), "moe_num_experts", "must be >= 1"),
    ("negative-top-k", dict(moe_top_k=-1), "moe_top_k", "must be >= 1"),
    ("zero-rank", dict(lora_rank=0), "lora_rank", "must be >= 1"),
    ("string-experts", dict(moe_num_experts="four"), "moe_num_experts", "must be an integer"),
    ("float-top-k", dict(moe_top_k=1.5), "moe_top_k", "must be an integer"),
    ("dropout-one", dict(lora_dropout=1.0), "lora_dropout", "must be <="),
    ("negative-alpha", dict(lora_alpha=-2), "lora_alpha", "must be >"),
    ("negative-aux-coef", dict(moe_aux_loss_coef=-0.1), "moe_aux_loss_coef", "must be >= 0"),
    ("moe-key-with-stock-lora", dict(finetuning_type="lora", moe_num_experts=4), "moe_num_experts",
     "only used with a llamafactory-moe"),
    ("unknown-key", dict(moe_topk=2), "moe_topk", "did you mean `moe_top_k`"),
    ("dora-conflict", dict(use_dora=True), "use_dora", "cannot be combined"),
    ("rslora-conflict", dict(use_rslora=True), "use_rslora", "cannot be combined"),
    ("pissa-conflict", dict(pissa_init=True), "pissa_init", "cannot be combined"),
    ("ppo-stage", dict(stage="ppo", reward_model="/nonexistent/rm"), "stage", "supported: pt, sft, dpo, kto, rm"),
    ("reentrant-checkpointing", dict(use_reentrant_gc=True), "use_reentrant_gc", "drops the gradient"),
    ("adapter-dir-without-config", dict(adapter_name_or_path="{empty_dir}"), "adapter_name_or_path",
     "has no adapter_config.json"),
    ("adapter-type-mismatch", dict(adapter_name_or_path="{lora_adapter}"), "adapter_name_or_path",
     "holds a `lora` adapter but `finetuning_type` is `moelora`"),
    ("corrupt-adapter-config", dict(adapter_name_or_path="{corrupt_adapter}"), "adapter_name_or_path",
     "unreadable adapter_config.json"),
]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    (root / "empty").mkdir()
    (root / "lora").mkdir()
    (root / "lora" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (root / "corrupt").mkdir()
    (root / "corrupt" / "adapter_config.json").write_text('{"peft_type": ')
    return {"empty_dir": str(root / "empty"), "lora_adapter": str(root / "lora"),
            "corrupt_adapter": str(root / "corrupt")}


def _materialise(overrides: dict, dirs: dict) -> dict:
    return {k: (v.format(**dirs) if isinstance(v, str) and "{" in v else v) for k, v in overrides.items()}


@pytest.mark.parametrize("case_id, overrides, key, words", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_invalid_config_rejected_while_parsing(case_id, overrides, key, words, adapter_dirs):
    from llamafactory.hparams import get_train_args

    args = {**BASE, **_materialise(overrides, adapter_dirs)}
    with pytest.raises(MoeConfigError) as info:
        get_train_args(args)
    message = str(info.value)
    assert f"`{key}`" in message, message
    assert words in message, message


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ["top-k-above-experts", "unknown-key", "unknown-method"])
def test_cli_exits_nonzero_with_one_line_and_no_traceback(case_id, adapter_dirs, tmp_path):
    overrides = dict(next(c for c in BAD_CONFIGS if c[0] == case_id)[1])
    proc = run_cli(["llamafactory-cli", "train"], {**BASE, **overrides}, tmp_path, timeout=300)
    assert proc.returncode != 0
    assert "llamafactory-moe: invalid configuration:" in proc.stderr
    assert "Traceback" not in proc.stderr
