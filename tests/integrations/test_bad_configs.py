"""Invalid configurations fail during argument parsing — before any model loads — naming key, value and what is allowed.

`model_name_or_path` points to a directory that does not exist: if validation did not stop the run first, loading the
model would fail with a different error, so each assertion on our message proves the check ran before model loading.
"""

from __future__ import annotations

import pytest

from llamafactory_moe.core.errors import MoeConfigError
from tests.conftest import run_cli, train_args

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
    ("reentrant-checkpointing", dict(use_reentrant_gc=True), "use_reentrant_gc", "is not supported: reentrant"),
    ("adapter-dir-without-config", dict(adapter_name_or_path="{empty_dir}"), "adapter_name_or_path",
     "has no adapter_config.json"),
    ("adapter-type-mismatch", dict(adapter_name_or_path="{lora_adapter}"), "adapter_name_or_path",
     "holds a `lora` adapter but `finetuning_type` is `moelora`"),
    ("corrupt-adapter-config", dict(adapter_name_or_path="{corrupt_adapter}"), "adapter_name_or_path",
     "unreadable adapter_config.json"),
    ("several-adapters", dict(adapter_name_or_path="{moelora_adapter},{moelora_adapter}"), "adapter_name_or_path",
     "lists several adapters"),
    ("several-adapters-one-ours", dict(finetuning_type="lora", adapter_name_or_path="{lora_adapter},{moelora_adapter}"),
     "adapter_name_or_path", "lists several adapters"),
    # -- every method: its own keys (wrong type, out of range, unknown choice), keys it ignores, stage, quantization --
    ("goat-scaling-mode-choice", dict(finetuning_type="goat", moe_scaling_mode="bogus"), "moe_scaling_mode",
     "must be one of 'alpha', 'gradient_alignment'"),
    ("goat-svd-shrink-negative", dict(finetuning_type="goat", moe_svd_shrink=-1.0), "moe_svd_shrink", "must be > 0"),
    ("goat-scaling-eta-type", dict(finetuning_type="goat", moe_scaling_eta="big"), "moe_scaling_eta",
     "must be a number"),
    ("goat-quantized-base", dict(finetuning_type="goat", quantization_bit=4), "quantization_bit",
     "cannot be used with `goat`, which corrects the frozen base weights"),
    ("goat-ppo-stage", dict(finetuning_type="goat", stage="ppo", reward_model="/nonexistent/rm"), "stage",
     "supported: pt, sft, dpo, kto, rm"),
    ("adamole-threshold-above-one", dict(finetuning_type="adamole", moe_max_threshold=2.0), "moe_max_threshold",
     "must be <= 1.0"),
    ("adamole-ignores-top-k", dict(finetuning_type="adamole", moe_top_k=2), "moe_top_k", "is not used by `adamole`"),
    ("d2mora-zero-down-experts", dict(finetuning_type="d2mora", moe_num_down_experts=0), "moe_num_down_experts",
     "must be >= 1"),
    ("d2mora-bool-type", dict(finetuning_type="d2mora", moe_per_expert_dropout="yes"), "moe_per_expert_dropout",
     "must be true or false"),
    ("hydralora-bool-type", dict(finetuning_type="hydralora", moe_head_balance_loss="maybe"), "moe_head_balance_loss",
     "must be true or false"),
    ("moslora-ignores-num-experts", dict(finetuning_type="moslora", moe_num_experts=4), "moe_num_experts",
     "is not used by `moslora`"),
    ("smora-top-k-above-rank", dict(finetuning_type="smora", moe_top_k=8, lora_rank=4), "moe_top_k",
     "must be <= `lora_rank` (4)"),
    ("smora-zero-partition", dict(finetuning_type="smora", moe_top_k=2, moe_rank_partition=0), "moe_rank_partition",
     "must be >= 1"),
    ("smora-negative-bias-rate", dict(finetuning_type="smora", moe_top_k=2, moe_bias_update_rate=-1.0),
     "moe_bias_update_rate", "must be >="),
    ("smore-layer-list-lengths", dict(finetuning_type="smore", moe_layer_num_experts=[4], moe_layer_top_k=[2, 2],
                                      moe_layer_ranks=[8, 8]), "moe_layer_top_k", "has 2 entries"),
    ("smore-ignores-lora-rank", dict(finetuning_type="smore", lora_rank=16),
     "lora_rank", "is not used by `smore`; remove it (`smore` sets this with `moe_layer_ranks`)"),
    ("smore-ignores-lora-alpha", dict(finetuning_type="smore", lora_rank=None, lora_alpha=32), "lora_alpha",
     "`moe_layer_lora_alpha`"),
    ("smore-gate-type-choice", dict(finetuning_type="smore", moe_gate_type="bogus"), "moe_gate_type",
     "must be one of 'switch', 'noisy_topk', 'dense'"),
    ("other-methods-key", dict(finetuning_type="moelora", moe_scaling_mode="alpha"), "moe_scaling_mode",
     "it applies to: goat"),
    ("unknown-stage", dict(stage="bogus"), "stage", "supported: pt, sft, dpo, kto, rm"),
    ("string-top-k", dict(moe_top_k="two"), "moe_top_k", "must be an integer"),
    ("string-rank", dict(lora_rank="8"), "lora_rank", "must be an integer"),
    ("loraplus-conflict", dict(loraplus_lr_ratio=16.0), "loraplus_lr_ratio", "cannot be combined"),
    ("llama-pro-conflict", dict(use_llama_pro=True), "use_llama_pro", "cannot be combined"),
    ("create-new-adapter-conflict", dict(create_new_adapter=True), "create_new_adapter", "cannot be combined"),
    ("resume-type-mismatch", dict(resume_from_checkpoint="{lora_adapter}"), "resume_from_checkpoint",
     "holds a `lora` adapter but `finetuning_type` is `moelora`"),
    ("resume-other-method", dict(finetuning_type="goat", resume_from_checkpoint="{moelora_adapter}"),
     "resume_from_checkpoint", "holds a `moelora` adapter but `finetuning_type` is `goat`"),
    ("resume-damaged-weights", dict(resume_from_checkpoint="{truncated_adapter}"), "resume_from_checkpoint",
     "adapter_model.safetensors"),
    # -- backends whose own LoRA path ours replaces (refused before LLaMA-Factory asks for their packages) --
    ("unsloth-conflict", dict(use_unsloth=True), "use_unsloth", "Unsloth builds its own plain-LoRA adapter"),
    ("unsloth-gc-conflict", dict(use_unsloth_gc=True), "use_unsloth_gc", "checkpointing is reentrant"),
    ("ktransformers-conflict", dict(use_kt=True), "use_kt", "KTransformers builds its own plain-LoRA adapter"),
    ("unsloth-with-our-adapter", dict(finetuning_type="lora", use_unsloth=True,
                                      adapter_name_or_path="{moelora_adapter}"), "use_unsloth", "for `moelora`"),
]


def _method_of(overrides: dict) -> str:
    return overrides.get("finetuning_type", BASE["finetuning_type"])


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    (root / "empty").mkdir()
    (root / "lora").mkdir()
    (root / "lora" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (root / "corrupt").mkdir()
    (root / "corrupt" / "adapter_config.json").write_text('{"peft_type": ')
    (root / "moelora").mkdir()
    (root / "moelora" / "adapter_config.json").write_text('{"peft_type": "MOELORA"}')
    (root / "truncated").mkdir()
    (root / "truncated" / "adapter_config.json").write_text('{"peft_type": "MOELORA"}')
    (root / "truncated" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    return {"empty_dir": str(root / "empty"), "lora_adapter": str(root / "lora"),
            "corrupt_adapter": str(root / "corrupt"), "moelora_adapter": str(root / "moelora"),
            "truncated_adapter": str(root / "truncated")}


def _materialise(overrides: dict, dirs: dict) -> dict:
    return {k: (v.format(**dirs) if isinstance(v, str) and "{" in v else v) for k, v in overrides.items()}


@pytest.mark.parametrize("case_id, overrides, key, words", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_invalid_config_rejected_while_parsing(case_id, overrides, key, words, adapter_dirs):
    from llamafactory.hparams import get_train_args

    args = {k: v for k, v in {**BASE, **_materialise(overrides, adapter_dirs)}.items() if v is not None}
    with pytest.raises(MoeConfigError) as info:
        get_train_args(args)
    message = str(info.value)
    assert f"`{key}`" in message, message
    assert words in message, message
    if key in overrides and "{" not in str(overrides[key]):  # the value the user wrote is quoted back
        assert f"({overrides[key]!r})" in message, message


def test_table_covers_every_method_and_enough_cases():
    from llamafactory_moe.core.peft_types import METHODS, register_all_methods

    register_all_methods()
    assert len(BAD_CONFIGS) >= 25
    assert set(METHODS) <= {_method_of(overrides) for _, overrides, _, _ in BAD_CONFIGS}


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ["top-k-above-experts", "unknown-key", "unknown-method", "goat-quantized-base",
                                     "smore-gate-type-choice"])
def test_cli_exits_nonzero_with_one_line_and_no_traceback(case_id, adapter_dirs, tmp_path):
    overrides = dict(next(c for c in BAD_CONFIGS if c[0] == case_id)[1])
    proc = run_cli(["llamafactory-cli", "train"], {**BASE, **overrides}, tmp_path, timeout=300)
    assert proc.returncode != 0
    assert "llamafactory-moe: invalid configuration:" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_mistake_known_only_when_the_model_is_built_is_one_line_too(tiny_model, tiny_data, tmp_path):
    """GOAT's `num_experts * expert_rank` must fit each wrapped layer's spectrum, which is known once the model's shapes
    are: raised while the model is built, it is still the one-line error in the user's yaml keys, and nothing trains."""
    out = tmp_path / "out"
    # the tiny model's layers are 64 wide: 8 experts x rank 16 = 128 singular triplets do not fit
    cfg = train_args(tiny_model, tiny_data, str(out), finetuning_type="goat", moe_num_experts=8, lora_rank=16)
    proc = run_cli(["llamafactory-cli", "train"], cfg, tmp_path, timeout=300)
    assert proc.returncode != 0
    expected = "llamafactory-moe: invalid configuration: `moe_num_experts` (8) times `lora_rank` (16) is 128"
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert "lower `lora_rank` / `moe_num_experts` or leave this module out of `lora_target`" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not list(out.glob("**/adapter_model.safetensors"))
