"""Resume and reload, for every method, against the uninterrupted training run.

* Resume: every method trains 4 steps with a checkpoint at step 2 (the reference). A second run resumes from a copy of
  that checkpoint-2. It must log steps 3 and 4 only, end with the reference's adapter tensors (buffers included) to
  1e-6, and leave every byte of checkpoint-2 unchanged.
* Reload: the logits of each trained model, computed in the training process right after its last step, must be
  bit-identical to those of the saved adapter loaded with `PeftModel.from_pretrained` in a fresh Python process.

Why the equality is not vacuous. A run that ignores `resume_from_checkpoint` and retrains from step 0 with the same seed
would reproduce the reference exactly. So the resumed runs use `warmup_steps: 2` (constant schedule after warmup),
while the reference uses no warmup: both schedules give the full learning rate at steps 3 and 4, the only steps a
resumed run trains. A run that skipped the checkpoint would train steps 1-2 at learning rates 0 and 1/2 and end
elsewhere. The negative controls run exactly that, plus two damaged resumes (optimizer state dropped, SMoRA's balancing
bias zeroed), and the tensor comparison must reject all of them.

The runs are batched: one interpreter trains every reference and control (`python -m tests.integrations.test_resume
plan.json`, each run is `llamafactory.train.tuner.run_exp`, what `llamafactory-cli train` runs, plus a callback that
records the trained model's logits). A second interpreter runs the in-process resumes. Meanwhile GOAT (routed, with an
aux loss and saved buffers) resumes through a real `llamafactory-cli train` subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.conftest import BASE_ENV, REPO_ROOT, read_jsonl, run_cli, train_args
from tests.method_cases import METHOD_CASES

pytestmark = pytest.mark.slow

TOL = 1e-6
# The first example of every method in METHOD_CASES, plus SMoRA's shipped variant (its bias is a trainable parameter
# and the balancing step is 1e-3, so the bias moves visibly) and S'MoRE's noisy gate (the resume must restore the RNG).
EXTRA_CASES = ("smora-as-shipped-gate", "smore-noisy-shared-pool")
CLI_CASE = "goat-top2"  # resumed by `llamafactory-cli train` in a subprocess
# Inputs for the logits comparison: a padded batch of two sequences.
IDS = [list(range(3, 40)), list(range(60, 90)) + [0] * 7]
MASK = [[1] * 37, [1] * 30 + [0] * 7]


def _cases() -> list[tuple[str, str, dict]]:
    seen, cases = set(), []
    for case_id, method, _, keys in METHOD_CASES:
        if method not in seen or case_id in EXTRA_CASES:
            seen.add(method)
            cases.append((case_id, method, keys))
    return cases


CASES = _cases()


# -- what runs inside the training interpreter ---------------------------------------------------------------------
def _record_trained_model(output_dir: str):
    from transformers import TrainerCallback

    class RecordTrainedModel(TrainerCallback):
        """At the end of training, in the training process: the model's logits on `IDS` (eval mode), and the names
        of every trainable parameter and every MoE-layer buffer (what the saved adapter must hold)."""

        def on_train_end(self, args, state, control, model=None, **kwargs):
            from llamafactory_moe.core.layer import MoeLoraLayer

            was_training = model.training
            model.eval()
            with torch.no_grad():
                logits = model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits
            model.train(was_training)
            torch.save(logits.detach().cpu(), os.path.join(output_dir, "trained_logits.pt"))
            buffers = [f"{name}.{buf}" for name, module in model.named_modules() if isinstance(module, MoeLoraLayer)
                       for buf, _ in module.named_buffers() if not buf.startswith("base_layer.")]
            trainable = [name for name, p in model.named_parameters() if p.requires_grad]
            with open(os.path.join(output_dir, "trained_state_names.json"), "w") as f:
                json.dump({"buffers": buffers, "trainable": trainable, "global_step": state.global_step}, f)

    return RecordTrainedModel()


def _drive(plan_path: str) -> None:
    from llamafactory.train.tuner import run_exp

    with open(plan_path) as f:
        runs = json.load(f)["runs"]
    for args in runs:
        run_exp(args=dict(args), callbacks=[_record_trained_model(args["output_dir"])])


def _run_plan(runs: list[dict], path: Path) -> subprocess.CompletedProcess:
    path.write_text(json.dumps({"runs": runs}))
    env = {**BASE_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), BASE_ENV.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "tests.integrations.test_resume", str(path)], cwd=path.parent,
                          env=env, capture_output=True, text=True, timeout=1200, check=False)


# -- helpers -----------------------------------------------------------------------------------------------------------
def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, \
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


def _hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:5]
    return max(((a[k].double() - b[k].double()).abs().max().item(), k) for k in a)


def _logged_steps(output_dir: Path) -> list[int]:
    return [row["current_steps"] for row in read_jsonl(output_dir / "trainer_log.jsonl") if row.get("loss") is not None]


def _saved_key(name: str) -> str:
    # peft drops the adapter name from the keys it saves: `...q_proj.smora_bias.default` -> `...q_proj.smora_bias`
    return ".".join(part for part in name.split(".") if part != "default")


# -- the runs ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tiny_model, tiny_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("resume")
    schedule = dict(lr_scheduler_type="constant_with_warmup", max_steps=4, save_steps=2)

    def config(case_id, method, keys, name, **over):
        return train_args(tiny_model, tiny_data, str(work / case_id / name), finetuning_type=method,
                          **{"moe_num_experts": None, "moe_top_k": None, "lora_rank": None, **schedule, **keys, **over})

    ref = {c: config(c, m, k, "ref", warmup_steps=0) for c, m, k in CASES}
    # Negative control: what a run that ignores `resume_from_checkpoint` produces (the resumed runs' config, from
    # step 0).
    scratch = {c: config(c, m, k, "scratch", warmup_steps=2) for c, m, k in CASES}
    _ok(_run_plan(list(ref.values()) + list(scratch.values()), work / "plan_ref.json"))

    resumed, hashes_before = {}, {}
    for case_id, method, keys in CASES:
        out = work / case_id / "resumed"
        shutil.copytree(work / case_id / "ref" / "checkpoint-2", out / "checkpoint-2")
        hashes_before[case_id] = _hashes(out / "checkpoint-2")
        resumed[case_id] = config(case_id, method, keys, "resumed", warmup_steps=2, overwrite_output_dir=False,
                                  resume_from_checkpoint=str(out / "checkpoint-2"))

    # Negative controls: resumes from a damaged copy of checkpoint-2.
    damaged = {}
    no_optimizer = work / "moelora-top2" / "no_optimizer"
    shutil.copytree(work / "moelora-top2" / "ref" / "checkpoint-2", no_optimizer / "checkpoint-2")
    (no_optimizer / "checkpoint-2" / "optimizer.pt").unlink()  # transformers then restarts AdamW and the schedule
    damaged["moelora-top2/no_optimizer"] = {**resumed["moelora-top2"], "output_dir": str(no_optimizer),
                                            "resume_from_checkpoint": str(no_optimizer / "checkpoint-2")}
    bias_reset = work / "smora" / "bias_reset"
    shutil.copytree(work / "smora" / "ref" / "checkpoint-2", bias_reset / "checkpoint-2")
    from safetensors.torch import save_file

    tensors = _tensors(bias_reset / "checkpoint-2")
    assert any(k.endswith("smora_bias") and v.abs().max() > 0 for k, v in tensors.items())
    save_file({k: torch.zeros_like(v) if k.endswith("smora_bias") else v for k, v in tensors.items()},
              str(bias_reset / "checkpoint-2" / "adapter_model.safetensors"), metadata={"format": "pt"})
    damaged["smora/bias_reset"] = {**resumed["smora"], "output_dir": str(bias_reset),
                                   "resume_from_checkpoint": str(bias_reset / "checkpoint-2")}

    in_process = [cfg for case_id, cfg in resumed.items() if case_id != CLI_CASE] + list(damaged.values())
    with ThreadPoolExecutor(2) as pool:  # the CLI resume and the in-process resumes run side by side
        cli = pool.submit(run_cli, ["llamafactory-cli", "train"], resumed[CLI_CASE], work)
        plan = pool.submit(_run_plan, in_process, work / "plan_resumed.json")
        _ok(cli.result())
        _ok(plan.result())
    return dict(ref=ref, scratch=scratch, resumed=resumed, damaged=damaged, hashes_before=hashes_before)


def test_resume_matches_the_uninterrupted_run_for_every_method(runs):
    for case_id, _, _ in CASES:
        ref, resumed = Path(runs["ref"][case_id]["output_dir"]), Path(runs["resumed"][case_id]["output_dir"])
        where = case_id + (" (llamafactory-cli)" if case_id == CLI_CASE else "")

        # (a) The resumed run trained steps 3 and 4 only: its own trainer_log.jsonl; trainer_state.json carries the
        # checkpoint's history of steps 1-2 over unchanged and adds 3 and 4 at the reference's learning rate.
        assert _logged_steps(ref) == [1, 2, 3, 4], where
        assert _logged_steps(resumed) == [3, 4], where
        state = json.loads((resumed / "trainer_state.json").read_text())
        ckpt_state = json.loads((ref / "checkpoint-2" / "trainer_state.json").read_text())
        ref_state = json.loads((ref / "trainer_state.json").read_text())
        steps = [e for e in state["log_history"] if "loss" in e]
        assert state["global_step"] == 4 and [e["step"] for e in steps] == [1, 2, 3, 4], where
        assert steps[:2] == [e for e in ckpt_state["log_history"] if "loss" in e], where
        ref_lr = [e["learning_rate"] for e in ref_state["log_history"] if "loss" in e]
        assert [e["learning_rate"] for e in steps[2:]] == ref_lr[2:], where
        assert (resumed / "checkpoint-4" / "adapter_model.safetensors").is_file(), where

        # (b) The final adapter equals the uninterrupted run's, every saved tensor (buffers included) to 1e-6 ...
        final_ref, final_resumed = _tensors(ref), _tensors(resumed)
        diff, key = _max_diff(final_resumed, final_ref)
        assert diff <= TOL, (where, key, diff)
        # ... the file holds every trainable parameter and every buffer of the MoE layers (names from the live model)
        names = json.loads((ref / "trained_state_names.json").read_text())
        assert names["global_step"] == 4 and names["trainable"], where
        missing = [n for n in names["trainable"] + names["buffers"] if _saved_key(n) not in final_ref]
        assert not missing, (where, missing[:5])
        # ... and it is not vacuous: the weights moved between step 2 and step 4, by far more than the tolerance.
        moved, key = _max_diff(_tensors(ref / "checkpoint-2"), final_ref)
        assert moved > 1e3 * TOL, (where, key, moved)

        # (c) Every byte of the checkpoint it read is unchanged, and the copy was the reference's checkpoint-2.
        before = runs["hashes_before"][case_id]
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                "trainer_state.json"} <= before.keys(), (where, sorted(before))
        assert _hashes(resumed / "checkpoint-2") == before == _hashes(ref / "checkpoint-2"), where

        # Negative control: the same config without the resume (what ignoring the checkpoint gives) logs steps 1-4
        # and ends far from the reference: the tensor comparison rejects it.
        scratch = Path(runs["scratch"][case_id]["output_dir"])
        assert _logged_steps(scratch) == [1, 2, 3, 4], where
        wrong, key = _max_diff(_tensors(scratch), final_ref)
        assert wrong > 100 * TOL, (where, "control not rejected", key, wrong)

    # Buffers that change during training are compared too: SMoRA's balancing bias moved between step 2 and 4.
    for case_id in ("smora", "smora-as-shipped-gate"):
        ref = Path(runs["ref"][case_id]["output_dir"])
        step2, final = _tensors(ref / "checkpoint-2"), _tensors(ref)
        bias = [k for k in final if k.endswith(("smora_bias", "smora_trainable_bias"))]
        assert bias and max((final[k] - step2[k]).abs().max().item() for k in bias) > 5 * TOL, case_id

    # Negative controls: damaged resumes are rejected by the comparison. They log steps 3-4 like a good resume, so
    # only the tensors can tell. A lost optimizer state moves the weights; a lost SMoRA bias shows in the saved bias
    # alone (it was 2e-5 at step 2, 20x the tolerance).
    for name, cfg in runs["damaged"].items():
        case_id = name.split("/")[0]
        out = Path(cfg["output_dir"])
        assert _logged_steps(out) == [3, 4], name
        damaged, ref = _tensors(out), _tensors(Path(runs["ref"][case_id]["output_dir"]))
        if name == "smora/bias_reset":
            damaged = {k: v for k, v in damaged.items() if k.endswith("smora_bias")}
            ref = {k: v for k, v in ref.items() if k.endswith("smora_bias")}
        wrong, key = _max_diff(damaged, ref)
        assert wrong > 5 * TOL, (name, "control not rejected", key, wrong)


def test_fresh_process_reload_gives_the_trained_models_logits(runs, tiny_model, tmp_path):
    """`PeftModel.from_pretrained` in a fresh interpreter (only the startup hook registers our PEFT types) gives the
    logits the trained model gave in its training process, bit for bit, for every method."""
    targets = {case_id: runs["ref"][case_id]["output_dir"] for case_id, _, _ in CASES}
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from peft import PeftModel\n"
        "targets, out = json.loads(sys.argv[1]), sys.argv[2]\n"
        f"ids, mask = torch.tensor({IDS!r}), torch.tensor({MASK!r})\n"
        "result = {}\n"
        "with torch.no_grad():\n"
        f"    base = AutoModelForCausalLM.from_pretrained({tiny_model!r}, dtype=torch.float32).eval()\n"
        "    result['base'] = base(input_ids=ids, attention_mask=mask).logits\n"
        "    for name, path in targets.items():\n"
        f"        base = AutoModelForCausalLM.from_pretrained({tiny_model!r}, dtype=torch.float32)\n"
        "        model = PeftModel.from_pretrained(base, path).eval()\n"
        "        result[name] = model(input_ids=ids, attention_mask=mask).logits\n"
        "torch.save(result, out)\n"
    )
    # Negative control: the step-2 checkpoint of each run, loaded the same way, must NOT give the final logits.
    targets.update({f"{case_id}@checkpoint-2": str(Path(path) / "checkpoint-2") for case_id, path in
                    list(targets.items())})
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(targets), str(tmp_path / "logits.pt")],
                          env=BASE_ENV, capture_output=True, text=True, timeout=600, check=False)
    _ok(proc)
    reloaded = torch.load(tmp_path / "logits.pt")
    for case_id, _, _ in CASES:
        trained = torch.load(Path(runs["ref"][case_id]["output_dir"]) / "trained_logits.pt")
        assert trained.shape == reloaded[case_id].shape == (2, 37, trained.shape[-1]), case_id
        assert torch.equal(reloaded[case_id], trained), (case_id, (reloaded[case_id] - trained).abs().max())
        # not vacuous: the adapter changes the output, and an earlier adapter of the same run is told apart
        assert (trained - reloaded["base"]).abs().max() > 1e-4, case_id
        assert not torch.equal(reloaded[f"{case_id}@checkpoint-2"], trained), case_id


if __name__ == "__main__":
    _drive(sys.argv[1])
