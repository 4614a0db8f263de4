"""Every LLaMA-Factory training stage our adapters support (pt, sft, dpo, kto, rm) trains on the tiny model; PPO is
refused before the model loads; the DPO/KTO reference pass (adapters disabled) is exactly the base model.

The stage runs share one interpreter (`run_exp_many.py`: each run is what `llamafactory-cli train` runs), so the
~30 s of imports are paid once. Data: LLaMA-Factory's own demo files (c4_demo for pt, dpo_en_demo for dpo and rm, from
../shared/data/llamafactory) and a tiny kto_tag dataset built here (LLaMA-Factory's kto_en_demo is not beside the repo).
`LLAMAFACTORY_MOE_FULL_MATRIX=1` trains every implemented method in every stage instead of moelora only.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import BASE_ENV, SHARED_DATA, read_jsonl, train_args
from tests.method_cases import METHOD_CASES

HELPER = Path(__file__).with_name("run_exp_many.py")
LF_DATA = SHARED_DATA / "llamafactory"
FULL_MATRIX = os.environ.get("LLAMAFACTORY_MOE_FULL_MATRIX") == "1"
STAGES = ("pt", "sft", "dpo", "kto", "rm")


def _implemented_cases(one_per_method: bool):
    from llamafactory_moe.methods import IMPLEMENTED

    seen, out = set(), []
    for case_id, method, _kwargs, lf_keys in METHOD_CASES:
        if method in IMPLEMENTED and not (one_per_method and method in seen):
            seen.add(method)
            out.append((case_id, method, lf_keys))
    return out


@pytest.fixture(scope="module")
def stage_data(tmp_path_factory) -> str:
    """A dataset_info.json naming LLaMA-Factory's demo files (absolute paths) plus a tiny kto_tag dataset."""
    if not (LF_DATA / "dataset_info.json").is_file():
        pytest.skip("../shared/data/llamafactory (LLaMA-Factory demo data) is not beside the repo")
    root = tmp_path_factory.mktemp("stage_data")
    upstream = json.loads((LF_DATA / "dataset_info.json").read_text())
    info = {name: {**upstream[name], "file_name": str(LF_DATA / upstream[name]["file_name"])}
            for name in ("c4_demo", "dpo_en_demo", "alpaca_en_demo")}
    rows = []
    for a in range(4):
        for b in range(4):
            good = (a + b) % 3 != 0
            answer = str(a + b) if good else str(a + b + 1)
            rows.append({"messages": [{"role": "user", "content": f"add {a} and {b}"},
                                      {"role": "assistant", "content": answer}], "label": good})
    (root / "kto_tiny.json").write_text(json.dumps(rows))
    info["kto_tiny"] = {"file_name": "kto_tiny.json", "formatting": "sharegpt",
                        "columns": {"messages": "messages", "kto_tag": "label"},
                        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                 "assistant_tag": "assistant"}}
    (root / "dataset_info.json").write_text(json.dumps(info))
    return str(root)


def _stage_args(stage: str, method: str, lf_keys: dict, model: str, data: str, out: str) -> dict:
    dataset = {"pt": "c4_demo", "sft": "alpaca_en_demo", "dpo": "dpo_en_demo", "kto": "kto_tiny",
               "rm": "dpo_en_demo"}[stage]
    return train_args(model, data, out, **{
        "stage": stage, "dataset": dataset, "finetuning_type": method, "moe_num_experts": None, "moe_top_k": None, "lora_rank": None,
        "max_samples": 16, "per_device_train_batch_size": 2, "max_steps": 2, "cutoff_len": 64, "save_steps": 2,
        **lf_keys})


def test_every_stage_trains_with_our_adapters(tiny_model, stage_data, tmp_path):
    cases = _implemented_cases(one_per_method=True)
    if not FULL_MATRIX:
        cases = [c for c in cases if c[1] == "moelora"]
    runs = [_stage_args(stage, method, lf_keys, tiny_model, stage_data, str(tmp_path / f"{stage}-{case_id}"))
            for case_id, method, lf_keys in cases for stage in STAGES]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"runs": runs}))
    proc = subprocess.run([sys.executable, str(HELPER), str(plan)], cwd=tmp_path, env=BASE_ENV, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-6000:]
    for run in runs:
        out = Path(run["output_dir"])
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["peft_type"] == run["finetuning_type"].upper(), out
        assert (out / "adapter_model.safetensors").stat().st_size > 0
        losses = [row["loss"] for row in read_jsonl(out / "trainer_log.jsonl") if row.get("loss") is not None]
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses), (out, losses)
        if run["stage"] == "rm":  # the value head is trained and saved beside the adapter
            assert (out / "value_head.safetensors").is_file() or (out / "value_head.bin").is_file()


def test_ppo_is_refused_before_the_model_loads():
    from llamafactory.hparams import get_train_args

    from llamafactory_moe.core.errors import MoeConfigError

    with pytest.raises(MoeConfigError) as info:
        get_train_args(dict(model_name_or_path="/nonexistent/never-loaded", stage="ppo", do_train=True,
                            finetuning_type="moelora", reward_model="/nonexistent/rm", dataset="x",
                            template="llama3", output_dir="/tmp/llamafactory_moe_ppo_out", report_to="none"))
    assert "`stage` ('ppo')" in str(info.value) and "supported: pt, sft, dpo, kto, rm" in str(info.value)


CASES = [pytest.param(case_id, method, id=case_id) for case_id, method, _ in _implemented_cases(one_per_method=False)]


@pytest.mark.parametrize("case_id, method", CASES)
def test_dpo_reference_pass_is_the_base_model(case_id, method):
    """LLaMA-Factory's DPO trainer computes the reference log-probs with the policy's adapters disabled
    (`CustomDPOTrainer.compute_reference_log_probs`, no separate ref model for LoRA-type adapters): run that very
    method on a model with trained (random) adapters and compare with the bare base model."""
    from llamafactory.train.dpo.trainer import CustomDPOTrainer
    from peft import get_peft_model

    from llamafactory_moe.core.peft_types import METHODS
    from tests.test_matrix import TARGETS, batch, randomise_adapters, tiny_llama

    kwargs = next(c[2] for c in METHOD_CASES if c[0] == case_id)
    base = tiny_llama(0)
    ids, mask = batch(0)
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=mask).logits.clone()
    model = get_peft_model(base, METHODS[method].config_cls(target_modules=TARGETS, **kwargs))
    randomise_adapters(model)
    model.eval()

    def concatenated_forward(_self, ref_model, batch_, is_ref_model=False):
        logits = ref_model(**batch_).logits
        return {"chosen_logps": logits, "rejected_logps": logits}

    trainer = SimpleNamespace(finetuning_args=SimpleNamespace(use_ref_model=True), ref_model=None,
                              accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    trainer.concatenated_forward = concatenated_forward.__get__(trainer)
    reference, _ = CustomDPOTrainer.compute_reference_log_probs(trainer, model,
                                                                {"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(reference, base_logits, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        policy = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(policy, base_logits, atol=1e-4), "the adapters must change the policy's logits"
