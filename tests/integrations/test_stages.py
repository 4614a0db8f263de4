"""Every LLaMA-Factory training stage our adapters support (pt, sft, dpo, kto, rm) trains with every method; PPO is
refused before the model loads; the DPO reference pass (adapters disabled) is exactly the base model; the no-grad
policy pass of KTO (its KL batch) adds nothing to the aux loss, the logs or SMoRA's balancing counts.

CI cost: one interpreter runs every method (its first case in tests/method_cases.py) in every stage through
`run_exp_many.py` (each run is what `llamafactory-cli train` runs), with a probe that snapshots the adapter at the start
of training and the model calls of the DPO/KTO runs; meanwhile one routed method (`moelora-top2`) runs every stage
through the real `llamafactory-cli train` subprocess. Data: LLaMA-Factory's own demo files (c4_demo for pt,
alpaca_en_demo for sft, dpo_en_demo for dpo and rm, from ../shared/data/llamafactory) and a tiny kto_tag dataset built
here (LLaMA-Factory's kto_en_demo is not beside the repo). `LLAMAFACTORY_MOE_FULL_MATRIX=1` runs every method case.

    python tests/integrations/test_stages.py plan.json     # the probing runner the module fixture launches
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

if __name__ == "__main__":  # run as the runner script: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import BASE_ENV, SHARED_DATA, read_jsonl, run_cli, train_args
from tests.method_cases import METHOD_CASES

LF_DATA = SHARED_DATA / "llamafactory"
FULL_MATRIX = os.environ.get("LLAMAFACTORY_MOE_FULL_MATRIX") == "1"
STAGES = ("pt", "sft", "dpo", "kto", "rm")
CLI_CASE = "moelora-top2"  # the routed method that also runs every stage through `llamafactory-cli train`
INITIAL = "initial_adapter.safetensors"  # the probe's snapshot of the adapter when training starts
CALLS = "model_calls.pt"  # the probe's record of every model call of a dpo / kto run
STEP_COUNTS = "step_counts.json"  # per optimizer step, each layer's step statistics (SMoRA's token counts) summed

# What each method logs besides `loss` / `lm_loss` (README "Methods" table: aux loss and routing columns). Aux terms:
# the method's own terms; methods without any (SMoRA: loss-free balancing; MoSLoRA; HydraLoRA unless
# `head_balance_loss`) still log `moe_aux_loss` = 0. Routing statistics: every routed method (all but MoSLoRA).
AUX_TERMS = {"moelora-top2": {"balance_loss"}, "moelora-soft": set(), "goat-top2": {"balance_loss"},
             "goat-gradient-alignment": {"balance_loss"}, "adamole": {"balance_loss"},
             "adamole-high-threshold": {"balance_loss"}, "d2mora": {"diversity_loss"},
             "d2mora-one-down-expert": {"diversity_loss"}, "hydralora": set(), "hydralora-balance": {"balance_loss"},
             "moslora": set(), "smora": set(), "smora-as-shipped-gate": set(), "smore-switch": {"balance_loss"},
             "smore-noisy-shared-pool": {"importance_loss", "load_loss"}, "smore-dense-eq-1-layer": set()}
ROUTING_KEYS = {"moe_load_cv", "moe_router_entropy"}
UNROUTED = {"moslora"}
# Trainable tensors that get no gradient by construction: D2MoRA's down-router with ONE down-expert is a softmax over a
# single logit, the constant 1.
NO_GRADIENT = {("d2mora-one-down-expert", "d2mora_router_down")}


def _implemented_cases(one_per_method: bool):
    seen, out = set(), []
    for case_id, method, _kwargs, lf_keys in METHOD_CASES:
        if not (one_per_method and method in seen):
            seen.add(method)
            out.append((case_id, method, lf_keys))
    return out


CASES = [pytest.param(case_id, method, id=case_id) for case_id, method, _ in _implemented_cases(one_per_method=False)]


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
        "stage": stage, "dataset": dataset, "finetuning_type": method, "moe_num_experts": None, "moe_top_k": None,
        "lora_rank": None, "max_samples": 8, "per_device_train_batch_size": 2, "max_steps": 2, "cutoff_len": 64,
        "save_steps": 1000, "disable_shuffling": True, **lf_keys})


# ---------------------------------------------------------------------------------------------------------------------
# The runner (this file as a script): run_exp_many.py with a probe that snapshots what the assertions compare against.
# ---------------------------------------------------------------------------------------------------------------------
def _runner_main(plan_path: str) -> None:
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    from llamafactory_moe.core.layer import MoeLoraLayer
    from tests.integrations import run_exp_many

    class StageProbe(TrainerCallback):
        """Writes into each run's output_dir: the adapter state when training starts (`INITIAL`, the same state dict
        PEFT saves; for rm the PeftModel inside the value-head wrapper), for dpo / kto every call of the trainer's
        model (`CALLS`: step, grad mode, adapters disabled or not, inputs, logits), and each step's SMoRA counts before
        the step hook consumes them (`STEP_COUNTS`; this probe's on_step_end runs first: `MoeStepCallback` is appended
        after the caller's callbacks)."""

        def __init__(self, output_dir: str):
            self.output_dir = output_dir
            self.calls, self.step, self.step_counts = [], 0, []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            os.makedirs(self.output_dir, exist_ok=True)
            peft_model = next(m for m in model.modules() if isinstance(m, PeftModel))
            initial = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
            save_file(initial, os.path.join(self.output_dir, INITIAL))
            with open(os.path.join(self.output_dir, "trainable.json"), "w") as f:
                json.dump(sorted(n for n, p in peft_model.named_parameters() if p.requires_grad), f)
            plan_run = next(r for r in runs if r["output_dir"] == self.output_dir)
            if plan_run["stage"] in ("dpo", "kto"):
                layer = next(m for m in model.modules() if isinstance(m, MoeLoraLayer))
                model.register_forward_hook(
                    lambda _m, _args, kw, out: self.calls.append({
                        "step": self.step, "grad": torch.is_grad_enabled(), "disabled": bool(layer.disable_adapters),
                        "input_ids": kw["input_ids"].detach().clone(),
                        "attention_mask": kw["attention_mask"].detach().clone(),
                        "logits": out.logits.detach().float().clone()}), with_kwargs=True)

        def on_step_begin(self, args, state, control, **kwargs):
            self.step = state.global_step + 1

        def on_step_end(self, args, state, control, model=None, **kwargs):
            layers = [m for m in model.modules() if isinstance(m, MoeLoraLayer)]
            self.step_counts.append([float(t.sum()) for layer in layers for t in layer.step_statistics()])

        def on_train_end(self, args, state, control, **kwargs):
            if self.calls:
                torch.save(self.calls, os.path.join(self.output_dir, CALLS))
            with open(os.path.join(self.output_dir, STEP_COUNTS), "w") as f:
                json.dump(self.step_counts, f)

    with open(plan_path) as f:
        runs = json.load(f)["runs"]
    import gc

    import llamafactory.train.tuner  # noqa: F401  (and every stage's workflow) before freezing
    from llamafactory.train.dpo import workflow as _dpo  # noqa: F401
    from llamafactory.train.kto import workflow as _kto  # noqa: F401
    from llamafactory.train.pt import workflow as _pt  # noqa: F401
    from llamafactory.train.rm import workflow as _rm  # noqa: F401
    from llamafactory.train.sft import workflow as _sft  # noqa: F401

    # Every Trainer.train() calls gc.collect() (accelerate's free_memory), which walks the ~600k objects the imports
    # made: 1 s per run on this machine. Frozen, they are skipped (they live until exit anyway).
    gc.freeze()
    run_exp_many.Probe = StageProbe  # run_exp_many's loop with this probe instead of its own
    run_exp_many.main(plan_path)


# ---------------------------------------------------------------------------------------------------------------------
# One launch for the module: the batched matrix (one interpreter) and, meanwhile, the CLI runs of one routed method.
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage_runs(tiny_model, stage_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    cases = _implemented_cases(one_per_method=not FULL_MATRIX)
    runs = {(case_id, stage): _stage_args(stage, method, lf_keys, tiny_model, stage_data,
                                          str(root / f"{stage}-{case_id}"))
            for case_id, method, lf_keys in cases for stage in STAGES}
    plan = root / "plan.json"
    plan.write_text(json.dumps({"runs": list(runs.values())}))
    # Output to files, not pipes: a full pipe would stall the runner while the CLI runs go on.
    with open(root / "matrix.out", "w") as out, open(root / "matrix.err", "w") as err:
        matrix = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(plan)], cwd=root, env=BASE_ENV,
                                  stdout=out, stderr=err)
        cli = {}
        try:
            for stage in STAGES:
                cfg = dict(runs[(CLI_CASE, stage)], output_dir=str(root / f"cli-{stage}"))
                proc = run_cli(["llamafactory-cli", "train"], cfg, root, timeout=900)
                cli[stage] = (cfg, proc)
            matrix.wait(timeout=1800)
        finally:
            if matrix.poll() is None:
                matrix.kill()
    assert matrix.returncode == 0, (root / "matrix.err").read_text()[-6000:]
    return SimpleNamespace(runs=runs, cli=cli, cases=cases)


def _adapter(out: Path, name: str = "adapter_model.safetensors") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / name))


def _check_trained(out: Path, stage: str, case_id: str, method: str) -> dict:
    """Files, finite losses, logged keys; returns the last log row."""
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper(), out
    rows = [row for row in read_jsonl(out / "trainer_log.jsonl") if row.get("loss") is not None]
    assert [row["current_steps"] for row in rows] == [1, 2], (out, rows)
    for row in rows:
        assert all(math.isfinite(row[k]) for k in ("loss", "lm_loss", "moe_aux_loss")), (out, row)
        expected = {"moe_aux_loss"} | {f"moe_{t}" for t in AUX_TERMS[case_id]}
        if method not in UNROUTED:
            expected |= ROUTING_KEYS
        moe_keys = {k for k in row if k.startswith("moe_")}
        assert expected <= moe_keys, (out, sorted(moe_keys), sorted(expected))
        assert not {k for k in moe_keys if k.endswith("_loss")} - expected, (out, sorted(moe_keys))
        if not AUX_TERMS[case_id]:
            assert row["moe_aux_loss"] == 0, (out, row)
        if method in UNROUTED:
            assert not moe_keys & ROUTING_KEYS, (out, sorted(moe_keys))
    if AUX_TERMS[case_id]:  # the terms were recorded, not merely listed (step 2: D2MoRA's is 0 while B = 0)
        assert rows[-1]["moe_aux_loss"] > 0, (out, rows[-1])
    if stage == "rm":  # the value head is trained and saved beside the adapter
        assert (out / "value_head.safetensors").is_file() or (out / "value_head.bin").is_file()
    return rows[-1]


def _check_moved(out: Path, case_id: str) -> None:
    """The saved (final) adapter differs from the one PEFT held when training started: every trainable parameter kind
    (e.g. `moelora_A`, `moelora_B`, `moelora_router`) moved in most of the wrapped layers. (Not in every layer: two
    steps from B = 0 can leave a router without gradient, e.g. D2MoRA's up-router once Adam's sign-like first step made
    the up-experts of a layer equal: a softmax over equal values has zero gradient.)"""
    initial, final = _adapter(out, INITIAL), _adapter(out)
    assert initial.keys() == final.keys() and initial, out
    trainable = {n.replace(".default", "") for n in json.loads((out / "trainable.json").read_text())}
    trained_keys = trainable & final.keys()
    assert len(trained_keys) == len(trainable), (out, sorted(trainable - final.keys())[:4])
    kinds: dict[str, list[bool]] = {}
    for key in trained_keys:
        kind = key.rsplit(".", 1)[-1]
        if (case_id, kind) not in NO_GRADIENT:
            kinds.setdefault(kind, []).append(not torch.equal(initial[key], final[key]))
    assert all(sum(moved) > len(moved) / 2 for moved in kinds.values()), (
        out, {kind: f"{sum(moved)}/{len(moved)} moved" for kind, moved in kinds.items()})


def test_every_method_trains_in_every_stage(stage_runs):
    for (case_id, stage), run in stage_runs.runs.items():
        out = Path(run["output_dir"])
        _check_trained(out, stage, case_id, run["finetuning_type"])
        _check_moved(out, case_id)


def test_llamafactory_cli_trains_every_stage(stage_runs):
    """The real `llamafactory-cli train` subprocess per stage ends with exactly the adapter of the same configuration
    run in the batched interpreter (same seed, data order and CPU kernels), whose weights moved from their start."""
    for stage, (cfg, proc) in stage_runs.cli.items():
        assert proc.returncode == 0, (stage, proc.stderr[-4000:])
        out = Path(cfg["output_dir"])
        _check_trained(out, stage, CLI_CASE, cfg["finetuning_type"])
        cli_adapter = _adapter(out)
        batched = _adapter(Path(stage_runs.runs[(CLI_CASE, stage)]["output_dir"]))
        assert cli_adapter.keys() == batched.keys()
        for key in cli_adapter:
            torch.testing.assert_close(cli_adapter[key], batched[key], atol=1e-6, rtol=1e-5, msg=f"{stage} {key}")


def _rebuild(tiny_model: str, out: Path):
    """The run's policy as it was when training started: the tiny base + the probe's initial adapter snapshot."""
    from peft import PeftModel, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out), is_trainable=True)
    set_peft_model_state_dict(model, _adapter(out, INITIAL))
    return model.train()


def _kto_policy_calls(out: Path, step: int) -> tuple[dict, dict]:
    calls = [c for c in torch.load(out / CALLS) if c["step"] == step and not c["disabled"]]
    target, kl = calls  # the policy calls of a step, in order (the reference calls have adapters disabled)
    assert target["grad"] and not kl["grad"], (out, [(c["grad"], c["disabled"]) for c in calls])
    return target, kl


def test_kto_smora_counts_only_the_policy_pass(stage_runs):
    """SMoRA's balancing counts of each KTO step are those of the target pass alone: per layer, top_k x the real
    tokens of the captured target batch (the KL batch, run under no_grad, would add its own tokens)."""
    cases = [(case_id, run) for (case_id, stage), run in stage_runs.runs.items()
             if stage == "kto" and run["finetuning_type"] == "smora"]
    assert cases
    for case_id, run in cases:
        out = Path(run["output_dir"])
        counts = json.loads((out / STEP_COUNTS).read_text())
        for step, per_layer in enumerate(counts, start=1):
            target, kl = _kto_policy_calls(out, step)
            expected = float(target["attention_mask"].sum()) * run["moe_top_k"]
            assert per_layer and set(per_layer) == {expected}, (case_id, step, sorted(set(per_layer)), expected,
                                                               float(kl["attention_mask"].sum()))


def test_kto_logs_the_aux_loss_of_the_policy_pass_only(stage_runs, tiny_model):
    """LLaMA-Factory's KTO trainer runs the policy twice per micro-batch: on the target batch (with gradients) and on
    the KL batch under `torch.no_grad()`. The logged step-1 `moe_aux_loss` must be the aux total of the target pass
    alone, recomputed here with a plain training forward of the initial adapter on the captured target batch, and
    not that plus the KL pass's (what was logged and added to the loss before the fix)."""
    from llamafactory_moe.core import loss_window

    checked = 0
    for (case_id, stage), run in stage_runs.runs.items():
        if stage != "kto" or not AUX_TERMS[case_id] or "noisy" in case_id:  # a noisy gate is not reproducible
            continue
        out = Path(run["output_dir"])
        target, kl = _kto_policy_calls(out, 1)
        model = _rebuild(tiny_model, out)
        totals = []
        for call in (target, kl):
            with loss_window.collect(token_mask=call["attention_mask"]) as window:
                logits = model(input_ids=call["input_ids"], attention_mask=call["attention_mask"]).logits
            totals.append(float(window.weighted_total().detach()))
            # the rebuilt policy is the run's: same logits as the trainer's call
            torch.testing.assert_close(logits.detach(), call["logits"], atol=1e-5, rtol=1e-5)
        logged = next(r for r in read_jsonl(out / "trainer_log.jsonl") if r.get("current_steps") == 1)["moe_aux_loss"]
        assert logged == pytest.approx(totals[0], abs=2e-6, rel=1e-5), (case_id, logged, totals)
        if totals[1] == 0:  # e.g. D2MoRA with one down-expert: its diversity term is 0 while B = 0
            continue
        # the KL pass's share, which the fix keeps out, is far above the logs' 6-decimal rounding
        assert totals[1] > 1e-5 and logged != pytest.approx(totals[0] + totals[1], abs=2e-6), (case_id, logged, totals)
        checked += 1
    assert checked >= 5, "moelora, goat, adamole, d2mora and smore must be checked"


def test_reference_pass_of_real_dpo_and_kto_runs_is_the_base_model(stage_runs, tiny_model):
    """In the real DPO and KTO runs, the reference calls (adapters disabled, no grad) give exactly the logits of the
    bare base model loaded here on the same inputs, while the policy's step-2 call (trained adapters on) does not."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for (case_id, stage), run in stage_runs.runs.items():
        if stage not in ("dpo", "kto"):
            continue
        calls = torch.load(Path(run["output_dir"]) / CALLS)
        reference = [c for c in calls if c["disabled"]]
        policy = [c for c in calls if not c["disabled"]]
        passes = 1 if stage == "dpo" else 2  # dpo: chosen + rejected in one call; kto: target, then KL batch
        assert [c["step"] for c in reference] == [1] * passes + [2] * passes, (case_id, stage)
        assert [c["step"] for c in policy] == [1] * passes + [2] * passes, (case_id, stage)
        assert not any(c["grad"] for c in reference) and policy[-passes]["grad"], (case_id, stage)
        with torch.no_grad():
            for call in reference + [policy[-passes]]:
                call["base"] = base(input_ids=call["input_ids"], attention_mask=call["attention_mask"]).logits
        for call in reference:
            torch.testing.assert_close(call["logits"], call["base"], atol=1e-5, rtol=1e-5, msg=f"{stage} {case_id}")
        step2 = policy[-passes]
        assert not torch.allclose(step2["logits"], step2["base"], atol=1e-4), (
            f"{stage} {case_id}: the step-2 policy must differ from the base model, or the comparison proves nothing")


def _forward_records(model, ids, mask, grad_mode, window_grad: bool = True):
    """One forward of `model` inside an aux-loss window (routing statistics requested) under `grad_mode`: the aux
    terms, the layer names with routing statistics and the logits it left behind."""
    from llamafactory_moe.core import loss_window

    with torch.set_grad_enabled(window_grad), loss_window.collect(token_mask=mask, collect_routing=True) as window:
        torch.manual_seed(0)  # the same noise for a noisy gate in every call
        with grad_mode:
            logits = model(input_ids=ids, attention_mask=mask).logits
    terms = {name: len(values) for name, values in window.terms.items()}
    return terms, set(window.routing), logits.detach().clone()


def _smora_counts(layers) -> list[float]:
    return [float(t.sum()) for layer in layers for t in layer.step_statistics()]


@pytest.mark.parametrize("case_id, method", CASES)
def test_no_grad_forward_of_a_training_model_records_nothing(case_id, method):
    """The rule every method goes through (`loss_window.recording()`): inside a training window, a forward under
    `torch.no_grad()` or `torch.inference_mode()` (KTO's KL pass) records no aux term, no routing statistics and no
    SMoRA count; the same forward with gradients records all of them; the outputs are the same either way. A window
    opened under no_grad in eval mode (`llamafactory-moe analyze`) still gets the routing statistics."""
    from llamafactory_moe.core.layer import MoeLoraLayer
    from tests.test_matrix import batch, make_peft, randomise_adapters

    kwargs = next(c[2] for c in METHOD_CASES if c[0] == case_id)
    model = make_peft(method, kwargs)
    randomise_adapters(model)
    model.train()
    layers = [m for m in model.modules() if isinstance(m, MoeLoraLayer)]
    names = {layer.moe_layer_name for layer in layers}
    ids, mask = batch()
    nothing = ({}, set(), [0.0] * len(_smora_counts(layers)))
    assert _smora_counts(layers) == nothing[2]

    terms, routing, no_grad_logits = _forward_records(model, ids, mask, torch.no_grad())
    assert (terms, routing, _smora_counts(layers)) == nothing
    terms, routing, inference_logits = _forward_records(model, ids, mask, torch.inference_mode())
    assert (terms, routing, _smora_counts(layers)) == nothing

    terms, routing, logits = _forward_records(model, ids, mask, torch.enable_grad())
    assert set(terms) == AUX_TERMS[case_id], terms
    assert all(n >= len(layers) for n in terms.values()), (terms, len(layers))  # at least once per layer
    assert routing == (set() if method in UNROUTED else names), sorted(routing)[:4]
    if method == "smora":  # every layer counted each real token top_k times
        assert _smora_counts(layers) == [float(mask.sum()) * kwargs["top_k"]] * len(layers)
    torch.testing.assert_close(no_grad_logits, logits, atol=0, rtol=0)
    torch.testing.assert_close(inference_logits, logits, atol=0, rtol=0)

    model.eval()  # the analysis path: window opened under no_grad, eval mode
    counts = _smora_counts(layers)
    terms, routing, _ = _forward_records(model, ids, mask, torch.no_grad(), window_grad=False)
    assert terms == {} and routing == (set() if method in UNROUTED else names), (terms, sorted(routing)[:4])
    assert _smora_counts(layers) == counts


def test_ppo_is_refused_before_the_model_loads():
    from llamafactory.hparams import get_train_args

    from llamafactory_moe.core.errors import MoeConfigError

    with pytest.raises(MoeConfigError) as info:
        get_train_args(dict(model_name_or_path="/nonexistent/never-loaded", stage="ppo", do_train=True,
                            finetuning_type="moelora", reward_model="/nonexistent/rm", dataset="x",
                            template="llama3", output_dir="/tmp/llamafactory_moe_ppo_out", report_to="none"))
    assert "`stage` ('ppo')" in str(info.value) and "supported: pt, sft, dpo, kto, rm" in str(info.value)


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


if __name__ == "__main__":
    _runner_main(sys.argv[1])
