"""Damaged or mismatched adapter checkpoints give one clear error naming the file (and the first mismatching tensor),
never a silent partial load; a crash in the middle of a save leaves the previous checkpoint loadable and unchanged, and
resuming never deletes or rewrites existing checkpoints.

Loading goes through LLaMA-Factory's own path (`get_infer_args` -> `load_tokenizer` -> `load_model` -> our
`init_adapter`), as `llamafactory-cli chat/api/train` do.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamafactory_moe.core.errors import MoeConfigError
from tests.conftest import BASE_ENV, final_train_loss, read_jsonl, run_cli, train_args

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _save_adapter(base_config_overrides: dict, out: Path, tiny_model: str, **method_kwargs) -> Path:
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from llamafactory_moe.core.peft_types import METHODS
    from llamafactory_moe.methods.moelora import MoeLoraConfig  # noqa: F401  (registers the type)

    config = AutoConfig.from_pretrained(tiny_model)
    for key, value in base_config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           METHODS["moelora"].config_cls(target_modules=TARGETS, **{"num_experts": 4, "top_k": 2,
                                                                                    "expert_rank": 4, **method_kwargs}))
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("damaged")
    good = _save_adapter({}, root / "good", tiny_model)
    out = {"good": good}

    def variant(name, damage):
        target = root / name
        shutil.copytree(good, target)
        damage(target)
        out[name] = target

    def truncate(d):
        data = (d / "adapter_model.safetensors").read_bytes()
        (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])

    def edit_config(d):
        config = json.loads((d / "adapter_config.json").read_text())
        config["num_experts"] = 8  # weights still hold 4 experts
        (d / "adapter_config.json").write_text(json.dumps(config))

    variant("truncated", truncate)
    variant("no-weights", lambda d: (d / "adapter_model.safetensors").unlink())
    variant("no-config", lambda d: (d / "adapter_config.json").unlink())
    variant("config-weights-mismatch", edit_config)
    variant("empty-weights-file", lambda d: (d / "adapter_model.safetensors").write_bytes(b""))
    # adapters trained on other base models: one layer deeper (extra tensors), or wider (other shapes)
    out["other-base-deeper"] = _save_adapter({"num_hidden_layers": 3}, root / "deeper", tiny_model)
    out["other-base-wider"] = _save_adapter({"intermediate_size": 96}, root / "wider", tiny_model)
    return out


def _load(tiny_model: str, adapter: Path):
    from llamafactory.hparams import get_infer_args
    from llamafactory.model import load_model, load_tokenizer

    model_args, _, finetuning_args, _ = get_infer_args(dict(model_name_or_path=tiny_model, template="llama3",
                                                             adapter_name_or_path=str(adapter)))
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    return load_model(tokenizer, model_args, finetuning_args, is_trainable=False)


# (case, exception type, words the message must contain)
DAMAGED = [
    ("truncated", MoeConfigError, ["`adapter_name_or_path`", "damaged", "adapter_model.safetensors"]),
    ("empty-weights-file", MoeConfigError, ["`adapter_name_or_path`", "damaged", "adapter_model.safetensors"]),
    ("no-weights", MoeConfigError, ["`adapter_name_or_path`", "has no adapter_model.safetensors"]),
    ("config-weights-mismatch", MoeConfigError,
     ["does not fit this base model", "adapter_model.safetensors", "mlp.down_proj.moelora_A`",
      "with shape [16, 128]", "needs [32, 128]"]),
    ("other-base-deeper", MoeConfigError,
     ["does not fit this base model", "model.layers.2.", "which this model has no place for"]),
    ("other-base-wider", MoeConfigError,
     ["does not fit this base model", "mlp.down_proj.moelora_A`", "with shape [16, 96]", "needs [16, 128]"]),
    # no adapter_config.json: the type is unknown, so stock peft reports it (naming the file)
    ("no-config", ValueError, ["adapter_config.json"]),
]


@pytest.mark.parametrize("case, exc_type, words", DAMAGED, ids=[c[0] for c in DAMAGED])
def test_damaged_adapter_is_a_clear_error(case, exc_type, words, adapters, tiny_model):
    with pytest.raises(exc_type) as info:
        _load(tiny_model, adapters[case])
    message = str(info.value)
    for word in words:
        assert word in message, message
    if exc_type is MoeConfigError:
        assert str(adapters[case]) in message


def test_intact_adapter_loads(adapters, tiny_model):
    from peft import PeftModel

    assert isinstance(_load(tiny_model, adapters["good"]), PeftModel)


def test_damaged_latest_checkpoint_is_named_before_auto_resume(adapters, tiny_model, tiny_data, tmp_path):
    """LLaMA-Factory resumes from the newest checkpoint-N of an existing output_dir on its own; a damaged one is
    reported before the model loads, naming the intact earlier checkpoint."""
    from llamafactory.hparams import get_train_args

    out = tmp_path / "out"
    shutil.copytree(adapters["good"], out / "checkpoint-2")
    shutil.copytree(adapters["truncated"], out / "checkpoint-4")
    args = train_args(tiny_model, tiny_data, str(out), overwrite_output_dir=False)
    with pytest.raises(MoeConfigError) as info:
        get_train_args(args)
    message = str(info.value)
    assert "`resume_from_checkpoint`" in message and "checkpoint-4" in message and "damaged" in message
    assert f"use the intact `{out / 'checkpoint-2'}`" in message


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_kill_during_save_leaves_previous_checkpoint_intact(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    args = train_args(tiny_model, tiny_data, str(out), max_steps=6, save_steps=2)
    (tmp_path / "args.json").write_text(json.dumps(args))
    helper = Path(__file__).with_name("crash_during_save.py")
    proc = subprocess.run([sys.executable, str(helper), str(tmp_path / "args.json"), "4"], cwd=tmp_path, env=BASE_ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    recorded = json.loads((out / "hashes.json").read_text())
    assert list(recorded) == ["checkpoint-2"]
    assert _hashes(out / "checkpoint-2") == recorded["checkpoint-2"]  # the crash touched nothing saved before
    # the half-written weights; peft writes adapter_config.json after the weights, so the killed save has none
    assert (out / "checkpoint-4" / "adapter_model.safetensors").stat().st_size > 0
    assert not (out / "checkpoint-4" / "adapter_config.json").exists()

    # The previous checkpoint loads.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llamafactory_moe.core.peft_types import register_all_methods

    register_all_methods()

    ids = torch.arange(3, 20).reshape(1, -1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        logits = PeftModel.from_pretrained(base, str(out / "checkpoint-2"))(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    assert (logits - base_logits).abs().max() > 1e-4  # the 2 trained steps are in it, not a zero update

    # Re-running the same command would auto-resume from the damaged checkpoint-4: refused, one line, nothing touched.
    again = {**args, "overwrite_output_dir": False}
    proc = run_cli(["llamafactory-cli", "train"], again, tmp_path)
    assert proc.returncode != 0
    assert "llamafactory-moe: invalid configuration: `resume_from_checkpoint`" in proc.stderr, proc.stderr[-3000:]
    assert "checkpoint-4" in proc.stderr and f"use the intact `{out / 'checkpoint-2'}`" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _hashes(out / "checkpoint-2") == recorded["checkpoint-2"]

    # Resuming from the intact checkpoint (into a new output_dir) trains on and leaves the old checkpoints alone.
    before_4 = _hashes(out / "checkpoint-4")
    resumed = {**args, "output_dir": str(tmp_path / "resumed"), "resume_from_checkpoint": str(out / "checkpoint-2")}
    proc = run_cli(["llamafactory-cli", "train"], resumed, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert torch.isfinite(torch.tensor(final_train_loss(tmp_path / "resumed")))
    # It trained steps 3-6 from checkpoint-2 (not 1-6 from scratch), and steps 3 and 4 repeat the killed run's losses.
    def losses(folder: Path) -> dict[int, float]:
        return {r["current_steps"]: r["loss"] for r in read_jsonl(folder / "trainer_log.jsonl") if "loss" in r}

    crashed, resumed_losses = losses(out), losses(tmp_path / "resumed")
    assert sorted(crashed) == [1, 2, 3, 4] and sorted(resumed_losses) == [3, 4, 5, 6], (crashed, resumed_losses)
    for step in (3, 4):
        assert resumed_losses[step] == pytest.approx(crashed[step], abs=1e-5), (step, crashed, resumed_losses)
    assert (tmp_path / "resumed" / "checkpoint-6" / "adapter_model.safetensors").is_file()
    assert _hashes(out / "checkpoint-2") == recorded["checkpoint-2"] and _hashes(out / "checkpoint-4") == before_4
