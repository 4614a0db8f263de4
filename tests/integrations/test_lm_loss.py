"""`lm_loss` is the logged `loss` without the aux terms, exactly, in transformers' own units.

How: with `learning_rate: 0` the weights never change, so a run with a large aux coefficient and a run with coefficient
0 see the same LM loss on every micro-batch; the first run's `lm_loss` must be the second run's `loss`. Gradient
accumulation 2 over 5 micro-batches per epoch makes optimizer steps of 2, 2 and 1 micro-batches, and with
`logging_steps: 2` a logging window of 1 + 2 micro-batches: a per-micro-batch mean of the aux terms is then not the
aux share of `loss` (the Trainer averages per optimizer step), so these checks fail for it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BASE_ENV, read_jsonl, train_args

# Two independently rounded 4-decimal losses (each within 5e-5 of its value) and the 6-decimal aux keys.
ROUNDING = 1.01e-4
AUX_COEF = 1.0  # large: the aux share must dwarf the rounding, and lr 0 keeps it from changing the weights


def _rows(history: list[dict]) -> list[dict]:
    return [row for row in history if row.get("loss") is not None]


def _assert_identity(rows: list[dict], where) -> None:
    assert rows, where
    for row in rows:
        assert "lm_loss" in row and "moe_aux_loss" in row, (where, row)
        assert abs(row["lm_loss"] + row["moe_aux_loss"] - row["loss"]) < 1e-4, (where, row)


@pytest.mark.slow
def test_lm_loss_in_llamafactory_runs_with_gradient_accumulation(tiny_model, tiny_data, tmp_path):
    """Three trainings in one interpreter (`run_exp_many.py`: each is what `llamafactory-cli train` runs): moelora with
    a large aux coefficient, the same with coefficient 0 (the reference LM loss), and stock LoRA (no key added)."""
    common = dict(learning_rate=0.0, gradient_accumulation_steps=2, max_samples=20, per_device_train_batch_size=4,
                  max_steps=4, logging_steps=2, plot_loss=True)
    runs = {
        "aux": train_args(tiny_model, tiny_data, str(tmp_path / "aux"), moe_aux_loss_coef=AUX_COEF, **common),
        "no_aux": train_args(tiny_model, tiny_data, str(tmp_path / "no_aux"), moe_aux_loss_coef=0.0, **common),
        "lora": train_args(tiny_model, tiny_data, str(tmp_path / "lora"), finetuning_type="lora",
                           moe_num_experts=None, moe_top_k=None, **common),
    }
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"runs": list(runs.values())}))
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("run_exp_many.py")), str(plan)],
                          cwd=tmp_path, env=BASE_ENV, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-6000:]

    logged = {}
    for name, run in runs.items():
        out = Path(run["output_dir"])
        jsonl = _rows(read_jsonl(out / "trainer_log.jsonl"))
        state = _rows(json.loads((out / "trainer_state.json").read_text())["log_history"])
        assert len(jsonl) == len(state) == 2, (name, jsonl, state)
        logged[name] = (jsonl, state, out)

    for name in ("aux", "no_aux"):
        jsonl, state, out = logged[name]
        _assert_identity(jsonl, (name, "trainer_log.jsonl"))
        _assert_identity(state, (name, "trainer_state.json"))
        assert [r["lm_loss"] for r in jsonl] == [r["lm_loss"] for r in state]
        assert (out / "training_lm_loss.png").stat().st_size > 1000
    aux_rows, reference = logged["aux"][1], logged["no_aux"][1]
    assert all(r["moe_aux_loss"] == 0 and r["lm_loss"] == r["loss"] for r in reference)
    for row, ref in zip(aux_rows, reference):
        assert row["moe_aux_loss"] > 1.0 and row["lm_loss"] < row["loss"] - 1.0, row
        assert abs(row["lm_loss"] - ref["loss"]) < ROUNDING, (aux_rows, reference)

    jsonl, state, out = logged["lora"]
    for row in jsonl + state:
        assert not [k for k in row if k == "lm_loss" or k.startswith("moe_")], row
    assert (out / "training_loss.png").is_file() and not (out / "training_lm_loss.png").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Plain transformers Trainer with our compute_loss / log wrappers: both of HF's normalisation paths and its NaN filter.
# ---------------------------------------------------------------------------------------------------------------------
NAN_CALL = 6  # the first micro-batch of optimizer step 4 (steps hold 2, 2, 1, 2 micro-batches)


def _train_plain_trainer(output_dir: Path, coef: float, mode: str) -> list[dict]:
    import torch
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from llamafactory_moe.integrations.llamafactory import _wrap_compute_loss, _wrap_log
    from llamafactory_moe.methods.moelora import MoELoRAConfig
    from tests.methods.common import tiny_llama

    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(10):  # 5 micro-batches of 2 per epoch; masked prompts of different lengths: unequal token counts
        ids = torch.randint(3, 128, (12,), generator=generator)
        labels = ids.clone()
        labels[: 2 + i % 7] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})

    calls = []

    def original_compute_loss(self, model, inputs, *args, **kwargs):
        loss = Trainer.compute_loss(self, model, inputs, *args, **kwargs)
        calls.append(1)
        if mode == "nan filtered" and len(calls) == NAN_CALL:
            loss = loss + torch.tensor(float("nan"))  # a NaN value with finite gradients (the weights stay finite)
        return loss

    class Patched(Trainer):
        compute_loss = _wrap_compute_loss(original_compute_loss, None)
        log = _wrap_log(Trainer.log, None)

    model = get_peft_model(tiny_llama(), MoELoRAConfig(target_modules=["q_proj", "v_proj", "up_proj"], num_experts=4,
                                                       top_k=2, expert_rank=2, aux_loss_coef=coef))
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=4, logging_steps=2, learning_rate=0.0, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, seed=0)
    trainer = Patched(model=model, args=args, train_dataset=rows)
    if mode == "trainer divides":
        trainer.model_accepts_loss_kwargs = False  # as LLaMA-Factory's dpo/kto/rm and multimodal sft trainers
    else:
        assert trainer.model_accepts_loss_kwargs  # the model normalises by the accumulation window's tokens
    trainer.train()
    assert len(calls) == 7
    return _rows(trainer.state.log_history)


@pytest.mark.parametrize("mode", ["model normalises", "trainer divides", "nan filtered"])
def test_lm_loss_is_the_loss_of_a_run_without_aux_terms(mode, tmp_path):
    with_aux = _train_plain_trainer(tmp_path / "aux", AUX_COEF, mode)
    reference = _train_plain_trainer(tmp_path / "no_aux", 0.0, mode)
    assert len(with_aux) == len(reference) == 2
    _assert_identity(with_aux, mode)
    for row, ref in zip(with_aux, reference):
        assert row["moe_aux_loss"] > 1.0 and row["lm_loss"] < row["loss"] - 1.0, row
        assert abs(row["lm_loss"] - ref["loss"]) < ROUNDING, (mode, with_aux, reference)
