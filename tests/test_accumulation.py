"""Gradient accumulation through LLaMA-Factory's trainer: GA=2 x batch 2 makes the same optimizer steps as GA=1 x
batch 4, LM loss and aux losses included, for every routed method (every method with a router: all but moslora).

What must match, and why the data are built as they are:

* LM loss. transformers (4.57) counts the label tokens of the whole accumulation window (``num_items_in_batch``) and
  the model divides each micro-batch's summed cross-entropy by that count, so the accumulated gradient is the full
  batch's token mean however unevenly the tokens fall into the micro-batches. (A per-micro-batch mean divided by GA
  is not: it weights the tokens of a short micro-batch more.) The ``distinct`` data make micro-batches with
  different label counts, so only the first normalisation passes.
* Aux losses. Every layer records its aux term as a mean over the micro-batch's real tokens, and ``_wrap_compute_loss``
  adds it with weight ``1 / GA``, so an optimizer step minimises the mean of the per-micro-batch aux terms. Those are
  not linear in the batch: a Switch loss is a product of two token means, a cv^2 a ratio, so with micro-batches of
  different content mean(aux(mb1), aux(mb2)) != aux(mb1 + mb2) even at equal lengths. The exact relation GA=2 x 2 ==
  GA=1 x 4 therefore holds when the two micro-batches hold the same rows: ``duplicated`` data ``[a, b, a, b]``
  (a and b of different lengths, so there is padding inside each micro-batch, which the aux means skip). D2MoRA's
  diversity term reads only the weights, so it is the same on any micro-batch and D2MoRA runs on the ``distinct``
  data (its LM normalisation and aux scaling checked at once); SMoRA has no aux loss (its balancing bias moves once
  per optimizer step from token counts summed over the micro-batches) and runs on the ``distinct`` data too.
* The Trainer-divides path (``model_accepts_loss_kwargs = False``: LLaMA-Factory's dpo/kto/rm and multimodal sft
  trainers): HF divides the whole micro-batch loss, aux included, by GA, and the patch must not divide again. Checked
  for MoELoRA on the ``duplicated`` data (per-micro-batch LM means are then exact too).
* Padding. Every call checks that the layers saw the micro-batch's attention mask. The Trainer hands ``compute_loss``
  the collator's ``BatchEncoding`` (a Mapping, not a dict); the patch used to test ``isinstance(inputs, dict)``, so in
  every LLaMA-Factory run the aux means and SMoRA's counts included the padding tokens. SMoRA's comparison caught it
  (the padding differs between the two settings; its update was off by up to 9500x the tolerance).

Each run makes 2 plain SGD steps (no momentum, no weight decay, no clipping, constant learning rate): the first moves
B (0 at init) and the routers (through the aux loss), the second everything. The test compares the adapter updates
``W_2 - W_0`` of the two accumulation settings, every trainable tensor and every adapter buffer.

The runner half of this file (``python tests/test_accumulation.py plan.json``) runs LLaMA-Factory's ``run_exp`` (what
``llamafactory-cli train`` runs) for several configurations in one interpreter. It snapshots the adapter at the start
and end of training, records what each ``compute_loss`` call saw, and can inject the two wrong scalings the negative
controls need.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

# ---------------------------------------------------------------------------------------------------------------------
# Runner (runs in a subprocess; imports LLaMA-Factory through the startup hook, so the patches are applied).
# ---------------------------------------------------------------------------------------------------------------------
FLAGS = "_accumulation_test"  # popped from a run's arguments before LLaMA-Factory parses them


def _adapter_state(model) -> dict:
    import torch

    from llamafactory_moe.core.layer import MoeLoraLayer

    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for layer_name, layer in model.named_modules():
        if isinstance(layer, MoeLoraLayer):
            for buffer_name, buffer in layer.named_buffers():
                if not buffer_name.startswith("base_layer."):
                    state[f"{layer_name}.{buffer_name}"] = buffer.detach().clone()
    return {n: t.to(torch.float64) for n, t in state.items()}


def _run_plan(plan_path: str) -> None:
    import llamafactory.train.sft.trainer as sft_trainer
    import torch
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    from llamafactory_moe.core import loss_window

    class Snapshots(TrainerCallback):
        def __init__(self, output_dir: str):
            self.output_dir = Path(output_dir)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.initial = _adapter_state(model)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            trainable = [n for n, p in model.named_parameters() if p.requires_grad]
            torch.save({"initial": self.initial, "final": _adapter_state(model), "trainable": trainable},
                       self.output_dir / "snapshots.pt")

    # accelerate's free_memory() runs gc.collect() at every training start: ~1 s over the imported module graph, per
    # run. Freezing what exists now makes those collections cheap without changing what they free.
    gc.freeze()
    patched = sft_trainer.CustomSeq2SeqTrainer.compute_loss  # already wrapped by our compute_loss patch
    original_total = loss_window.LossWindow.weighted_total
    plan = json.loads(Path(plan_path).read_text())
    for args in plan["runs"]:
        args = dict(args)
        flags = args.pop(FLAGS, {})
        calls = []

        def compute_loss(self, model, inputs, *a, _flags=flags, _calls=calls, **kw):
            if _flags.get("trainer_divides"):  # as LLaMA-Factory's dpo/kto/rm and multimodal sft trainers
                self.model_accepts_loss_kwargs = False
            accumulation = self.current_gradient_accumulation_steps
            num_items = kw.get("num_items_in_batch")
            _calls.append({"accumulation": accumulation, "rows": int(inputs["input_ids"].shape[0]),
                           "width": int(inputs["input_ids"].shape[1]),
                           "real_tokens": int(inputs["attention_mask"].sum()),
                           "padding": int((inputs["attention_mask"] == 0).sum()),
                           "labels": int((inputs["labels"] != -100).sum()),
                           "num_items_in_batch": None if num_items is None else int(num_items),
                           "model_accepts_loss_kwargs": bool(self.model_accepts_loss_kwargs)})
            if _flags.get("per_microbatch_lm_mean"):  # wrong: each micro-batch's own token mean, divided by GA
                kw["num_items_in_batch"] = None
                result = patched(self, model, inputs, *a, **kw) / accumulation
            else:
                result = patched(self, model, inputs, *a, **kw)
            # The padding mask the layers' aux terms (and SMoRA's counts) used: it outlives the window.
            mask = loss_window.batch_token_mask(int(inputs["attention_mask"].numel()))
            _calls[-1]["layers_saw_mask"] = mask is not None and int(mask.sum()) == _calls[-1]["real_tokens"]
            return result

        factor = float(flags.get("aux_factor", 1.0))

        def weighted_total(window, _factor=factor):
            total = original_total(window)
            return total if total is None or _factor == 1.0 else total * _factor  # wrong scaling when != 1

        sft_trainer.CustomSeq2SeqTrainer.compute_loss = compute_loss
        loss_window.LossWindow.weighted_total = weighted_total
        try:
            run_exp(args=args, callbacks=[Snapshots(args["output_dir"])])
        finally:
            sft_trainer.CustomSeq2SeqTrainer.compute_loss = patched
            loss_window.LossWindow.weighted_total = original_total
        (Path(args["output_dir"]) / "calls.json").write_text(json.dumps(calls))


if __name__ == "__main__":
    _run_plan(sys.argv[1])
    sys.exit(0)

# ---------------------------------------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------------------------------------
import re  # noqa: E402 - below the script part above, which runs in a child process without pytest

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.conftest import BASE_ENV, train_args  # noqa: E402
from tests.method_cases import METHOD_CASES  # noqa: E402

# One case per routed method (with its aux loss switched on where the method has one).
ROUTED = {"moelora": "moelora-top2", "goat": "goat-top2", "adamole": "adamole", "d2mora": "d2mora",
          "hydralora": "hydralora-balance", "smora": "smora", "smore": "smore-switch"}
DISTINCT_DATA = {"d2mora", "smora"}  # aux independent of the batch (or none): any micro-batches compare exactly
# Large, so the aux share of the update is far above the tolerance. D2MoRA's diversity gradient scales as 1/|B_j|
# and B is 0 at init: at 1.0 the second step throws B to ~500.
AUX_COEF = {"d2mora": 1e-2}
LEARNING_RATE = 1.0
# Per tensor: max|dW(GA=2) - dW(GA=1)| <= RTOL * max|dW(GA=1)| + ATOL, dW = W_2 - W_0. Float32 reassociation (GEMMs
# over 2 rows vs 4, gradients summed over two backward passes); ATOL is ~13 float32 ulps of a 0.1-sized weight.
# Measured: at most 0.1 of the allowance (without the padding-mask fix, SMoRA was off by up to 9500 allowances).
RTOL, ATOL = 1e-4, 1e-7
# Each kind of trainable tensor (A, B, router, ...) must move by at least 500 x ATOL in some layer: the comparison is
# not 0 == 0. (q/k projections of a random 2-layer model get tiny LM gradients, so not every layer moves that much.)
MIN_MOVE = 500 * ATOL


def _rows() -> dict[str, list[dict]]:
    short = [{"instruction": "add 1 and 2", "input": "", "output": "3"},
             {"instruction": "add 4 and 4", "input": "", "output": "8"}]
    long = [{"instruction": "what do you get when you add the numbers 7 and 5 together", "input": "",
             "output": "adding 7 and 5 gives 12, which is the sum"},
            {"instruction": "please write the sum of 9 and 9 as a word", "input": "",
             "output": "the sum of nine and nine is eighteen"}]
    mid = [{"instruction": "sort 3 1 2", "input": "", "output": "1 2 3 in order"},
           {"instruction": "reverse the word cat", "input": "", "output": "the reverse is tac"}]
    a, b, c, d = short[0], long[0], short[1], long[1]
    return {
        # step 1 = [a, b | a, b], step 2 = [c, d | c, d]: both micro-batches of a step hold the same rows
        "duplicated": [a, b, a, b, c, d, c, d],
        # step 1 = [a, c | b, d], step 2 = [mid0, a | d, mid1]: micro-batches with different label counts and widths
        "distinct": [a, c, b, d, mid[0], a, d, mid[1]],
    }


def _case(case_id: str) -> dict:
    return next(lf_keys for cid, _method, _kwargs, lf_keys in METHOD_CASES if cid == case_id)


def _run(tiny_model, data_dir, out: Path, method: str, accumulation: int, dataset: str, **flags) -> dict:
    keys = {"moe_num_experts": None, "moe_top_k": None, "lora_rank": None, **_case(ROUTED[method])}
    if method == "smora":  # bias steps of +-u per optimizer step: large enough to see (and compare) after 2 steps
        keys["moe_bias_update_rate"] = 1e-2
    else:
        keys["moe_aux_loss_coef"] = AUX_COEF.get(method, 1.0)
    args = train_args(tiny_model, str(data_dir), str(out), finetuning_type=method, **keys, dataset=dataset,
                      per_device_train_batch_size=4 // accumulation, gradient_accumulation_steps=accumulation,
                      max_steps=2, max_samples=None, optim="sgd", learning_rate=LEARNING_RATE, max_grad_norm=0.0,
                      lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, disable_shuffling=True,
                      save_strategy="no", plot_loss=False)
    if flags:
        args[FLAGS] = flags
    return args


def _outputs(run: dict) -> dict:
    out = Path(run["output_dir"])
    result = torch.load(out / "snapshots.pt")
    result["calls"] = json.loads((out / "calls.json").read_text())
    result["history"] = [r for r in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in r]
    return result


def _update_mismatches(one: dict, two: dict) -> dict[str, float]:
    """Tensors whose update W_2 - W_0 differs between two runs by more than the tolerance: name -> error / allowed."""
    assert one["initial"].keys() == two["initial"].keys() == one["final"].keys() == two["final"].keys()
    bad = {}
    for name, start in one["initial"].items():
        assert torch.equal(start, two["initial"][name]), f"{name}: the runs start from different weights"
        update_1, update_2 = one["final"][name] - start, two["final"][name] - start
        allowed = RTOL * update_1.abs().max().item() + ATOL
        error = (update_1 - update_2).abs().max().item()
        if error > allowed:
            bad[name] = error / allowed
    return bad


def _largest_move_per_kind(run: dict, names) -> dict[str, float]:
    moves = {}
    for name in names:
        kind = re.sub(r"^.*layers\.\d+\.\w+\.\w+_proj\.", "", name)  # e.g. moelora_router.default
        move = (run["final"][name] - run["initial"][name]).abs().max().item()
        moves[kind] = max(moves.get(kind, 0.0), move)
    return moves


@pytest.fixture(scope="module")
def accumulation_runs(tiny_model, tmp_path_factory):
    """Every run of this file in one interpreter (one LLaMA-Factory start-up)."""
    root = tmp_path_factory.mktemp("accumulation")
    data_dir = root / "data"
    data_dir.mkdir()
    info = {}
    for name, rows in _rows().items():
        (data_dir / f"{name}.json").write_text(json.dumps(rows))
        info[name] = {"file_name": f"{name}.json"}
    (data_dir / "dataset_info.json").write_text(json.dumps(info))

    runs = {}
    for method in ROUTED:
        dataset = "distinct" if method in DISTINCT_DATA else "duplicated"
        for accumulation in (1, 2):
            runs[method, accumulation] = _run(tiny_model, data_dir, root / f"{method}-ga{accumulation}", method,
                                              accumulation, dataset)
    # The Trainer-divides path (model_accepts_loss_kwargs False, as in dpo/kto/rm and multimodal sft): HF divides
    # LM + aux by GA itself. Its GA=1 run is the moelora GA=1 run (one micro-batch: its mean is the window's).
    runs["moelora-trainer-divides", 2] = _run(tiny_model, data_dir, root / "moelora-trainer-divides", "moelora", 2,
                                              "duplicated", trainer_divides=True)
    # Negative controls: the aux terms added without 1 / GA; the LM loss as each micro-batch's own mean / GA.
    runs["control-aux-not-divided", 2] = _run(tiny_model, data_dir, root / "control-aux", "moelora", 2, "duplicated",
                                              aux_factor=2.0)
    runs["control-lm-mean-per-micro-batch", 2] = _run(tiny_model, data_dir, root / "control-lm", "smora", 2,
                                                      "distinct", per_microbatch_lm_mean=True)
    plan = root / "plan.json"
    plan.write_text(json.dumps({"runs": list(runs.values())}))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(plan)], cwd=root, env=BASE_ENV,
                          capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return {key: _outputs(run) for key, run in runs.items()}


def _check_calls(calls: list[dict], accumulation: int, model_normalises: bool) -> None:
    """The runs really accumulated: 2 optimizer steps of `accumulation` micro-batches of 4 / GA rows each; the layers
    saw each micro-batch's padding mask."""
    assert len(calls) == 2 * accumulation, calls
    for call in calls:
        assert call["accumulation"] == accumulation and call["rows"] == 4 // accumulation, call
        assert call["model_accepts_loss_kwargs"] == model_normalises, call
        assert call["layers_saw_mask"], call
    if model_normalises:  # the window's label count reaches the model
        for step in range(2):
            window = calls[step * accumulation:(step + 1) * accumulation]
            assert all(c["num_items_in_batch"] == sum(w["labels"] for w in window) for c in window), window


@pytest.mark.parametrize("method", list(ROUTED))
def test_accumulated_steps_equal_full_batch_steps(method, accumulation_runs):
    full, accumulated = accumulation_runs[method, 1], accumulation_runs[method, 2]
    _check_calls(full["calls"], 1, True)
    _check_calls(accumulated["calls"], 2, True)
    calls = accumulated["calls"]
    assert all(c["padding"] > 0 for c in full["calls"])  # the aux means (and SMoRA's counts) must skip padding
    if method in DISTINCT_DATA:  # non-vacuous: the micro-batches of a step differ in label count (and width)
        assert calls[0]["labels"] != calls[1]["labels"] and calls[2]["labels"] != calls[3]["labels"], calls
    else:  # both micro-batches hold the same rows, with padding inside them
        assert calls[0] == calls[1] and calls[2] == calls[3] and calls[0]["padding"] > 0, calls
    moves = _largest_move_per_kind(full, full["trainable"])
    assert all(move > MIN_MOVE for move in moves.values()), moves
    if method == "smora":  # the balancing bias (a buffer) moved too
        assert _largest_move_per_kind(full, [n for n in full["initial"] if "smora_bias" in n]) == {
            "smora_bias.default": pytest.approx(2e-2)}
    assert _update_mismatches(full, accumulated) == {}
    # The logged per-step objective agrees too (loss rounded to 4 decimals, aux terms to 6, float32 sums over layers).
    for row_full, row_acc in zip(full["history"], accumulated["history"], strict=True):
        assert abs(row_full["loss"] - row_acc["loss"]) <= 2e-4, (row_full, row_acc)
        if method != "smora":
            assert row_full["moe_aux_loss"] > 1e-3, row_full  # the aux loss is on
            assert abs(row_full["moe_aux_loss"] - row_acc["moe_aux_loss"]) <= 1e-5 * row_full["moe_aux_loss"] + 2e-6, (
                row_full, row_acc)


def test_accumulation_when_the_trainer_divides(accumulation_runs):
    """``model_accepts_loss_kwargs = False``: HF divides the whole micro-batch loss (LM + aux) by GA itself, and our
    patch must then not divide the aux terms again."""
    accumulated = accumulation_runs["moelora-trainer-divides", 2]
    _check_calls(accumulated["calls"], 2, False)
    assert _update_mismatches(accumulation_runs["moelora", 1], accumulated) == {}


def test_negative_controls_wrong_scalings_fail_the_check(accumulation_runs):
    # Aux terms added without 1 / GA: the routers' update differs (and only tensors the aux loss reaches).
    bad = _update_mismatches(accumulation_runs["moelora", 1], accumulation_runs["control-aux-not-divided", 2])
    worst = sorted(bad.items(), key=lambda item: -item[1])[:3]
    print(f"\naux not divided by GA: {len(bad)} tensors off, worst error/allowed {worst}")
    assert any("router" in name and ratio > 10 for name, ratio in bad.items()), bad
    # The LM loss as a per-micro-batch mean divided by GA: with unequal label counts the update differs.
    bad = _update_mismatches(accumulation_runs["smora", 1], accumulation_runs["control-lm-mean-per-micro-batch", 2])
    worst = sorted(bad.items(), key=lambda item: -item[1])[:3]
    print(f"LM mean per micro-batch: {len(bad)} tensors off, worst error/allowed {worst}")
    assert any(ratio > 10 for ratio in bad.values()), bad
