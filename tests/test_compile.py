"""``torch.compile`` on every method: graph-break-free, no recompilation when only the number of tokens changes, the
same numbers as eager, and LLaMA-Factory's ``torch_compile: true`` through the real CLI.

Layer tests (a ``Linear(24, 20)`` wrapped by peft, adapters randomised so nothing is zero) run every case of
``tests/method_cases.py`` with ``fullgraph=True`` (any graph break raises) in three modes, each over three token counts
(10, 14 and 12 tokens, the token dimensions marked dynamic):

* **train**: an aux-loss window open with routing statistics collected (``loss_window.collect(collect_routing=True)``),
  forward + aux + backward, then the once-per-step update (SMoRA's bias, ``core/step_hooks.py``) and an SGD step, so the
  next step runs with the updated bias and weights;
* **checkpoint**: the same under non-reentrant ``torch.utils.checkpoint`` (what LLaMA-Factory forces); dynamo traces it
  as a higher-order op, which needs ``core/compiling.py``'s setting (applied by our tuner);
* **eval**: ``model.eval()`` under ``no_grad``;
* **no_grad_in_window**: a training window open with gradients and the layer run under ``no_grad`` (KTO's KL pass):
  ``loss_window.pause_unless_counted`` (which reads ``torch._C._is_fwd_grad_enabled`` and the grad mode) pauses the
  window, so nothing is recorded and SMoRA counts nothing, compiled as in eager.

Each mode compiles exactly one graph (``CompileCounterWithBackend``: one frame across the three token counts), and the
compiled layer reproduces the eager one to 1e-5 (fp32): output, input gradient, every parameter gradient, every aux
term, every routing summary, SMoRA's step counts and bias after the update, and the parameters after the steps.

The full matrix uses backend ``aot_eager`` (dynamo + AOTAutograd: the joint graph inductor receives, without C++ code
generation, which costs ~10-30 s per graph on this 2-core CPU). Inductor itself runs one case per routed method family
(MoELoRA, SMoRA, S'MoRE, GOAT) in training mode, with ``fallback_random`` so S'MoRE's noise matches eager; marked slow.
Gradient checkpointing is also checked at model level: a tiny Llama with
``gradient_checkpointing_enable(use_reentrant=False)`` compiled with ``fullgraph=True``.

The LLaMA-Factory tests (slow): one real ``llamafactory-cli train`` with ``torch_compile: true`` (MoELoRA), and every
other method batched in one interpreter (``tests/integrations/run_exp_many.py``: each run is LLaMA-Factory's
``run_exp``, what the CLI runs); 3 steps each; the saved adapter, loaded with ``PeftModel.from_pretrained`` in a fresh
process, gives the logits of the trained adapter state (the probe's end-of-training snapshot) on the tiny model.

Runtime on the 2-core CI machine, quiet: the whole file 252 s with a cold inductor cache (164 s warm); without the slow
tests about 60 s. Under load from other jobs the non-slow part took up to 180 s.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from peft import get_peft_model
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.checkpoint import checkpoint

from llamafactory_moe.core import loss_window
from llamafactory_moe.core.layer import MoeLoraLayer
from llamafactory_moe.core.peft_types import METHODS, register_all_methods
from llamafactory_moe.core.step_hooks import apply_optimizer_step_updates
from tests.conftest import BASE_ENV, run_cli, train_args
from tests.method_cases import INDUCTOR_CASES, METHOD_CASES, METHOD_PARAMS, fresh_dynamo  # noqa: F401 (fixture)

register_all_methods()
CASES = METHOD_PARAMS
IN, OUT = 24, 20
SHAPES = [(2, 5), (2, 7), (3, 4)]  # (batch, seq): 10, 14, 12 tokens; batch >= 2 (dynamo specialises sizes 0 and 1)
TOL = dict(atol=1e-5, rtol=1e-5)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class Host(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.proj(x)


def make_layer_model(method: str, kwargs: dict) -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(Host(), METHODS[method].config_cls(target_modules=["proj"], init_weights=False, **kwargs))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


# Three distinct functions (distinct code objects, so each mode's cache entries are its own).
def _call_train(model, x):
    return model(x)


def _call_checkpointed(model, x):
    return checkpoint(model, x, use_reentrant=False)


def _call_eval(model, x):
    return model(x)


def _call_no_grad_in_window(model, x):
    return model(x)


MODES = {"train": _call_train, "checkpoint": _call_checkpointed, "eval": _call_eval,
         "no_grad_in_window": _call_no_grad_in_window}


def _batch(shape, step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(*shape, IN, generator=g)
    mask = torch.ones(shape, dtype=torch.long)
    mask[-1, shape[1] // 2:] = 0  # right padding: the balance statistics must skip it
    weights = torch.randn(*shape, OUT, generator=g)
    return x, mask, weights


def _step(model, fn, mode, shape, step, dynamic):
    """One step of ``fn(model, x)``; returns everything the compiled and eager runs must agree on."""
    x, mask, weights = _batch(shape, step)
    if dynamic:
        for t in (x, mask):
            torch._dynamo.mark_dynamic(t, 0)
            torch._dynamo.mark_dynamic(t, 1)
    torch.manual_seed(7 + step)  # noisy gates draw the same noise in both runs
    if mode == "eval":
        model.eval()
        with torch.no_grad():
            return {"out": fn(model, x)}
    if mode == "no_grad_in_window":  # KTO's KL pass: `loss_window.pause_unless_counted` pauses the training window
        model.train()
        with loss_window.collect(token_mask=mask, collect_routing=True) as window:
            with torch.no_grad():
                out = fn(model, x)
        layers = [m for m in model.modules() if isinstance(m, MoeLoraLayer)]
        assert not window.terms and not window.routing and not window.paused
        assert all(not stat.any() for layer in layers for stat in layer.step_statistics())  # SMoRA counted nothing
        return {"out": out}
    model.train()
    x.requires_grad_(True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    with loss_window.collect(token_mask=mask, collect_routing=True) as window:
        out = fn(model, x)
    aux = window.weighted_total()
    loss = (out * weights).sum() + (aux if aux is not None else 0.0)
    loss.backward()
    result = {"out": out.detach(), "x.grad": x.grad}
    result.update({f"grad:{n}": p.grad for n, p in params.items()})
    result.update({f"aux:{k}": v for k, v in window.term_totals().items()})
    for layer, summaries in window.routing.items():
        for i, summary in enumerate(summaries):
            result.update({f"routing:{layer}:{i}:{k}": v for k, v in summary.items()})
    layers = [m for m in model.modules() if isinstance(m, MoeLoraLayer)]
    for i, layer in enumerate(layers):
        for j, stat in enumerate(layer.step_statistics()):
            result[f"step_stat:{i}:{j}"] = stat.clone()
    apply_optimizer_step_updates(model)
    with torch.no_grad():
        for p in params.values():
            if p.grad is not None:
                p.sub_(0.05 * p.grad)
    result.update({f"state:{k}": v.detach().clone() for k, v in model.state_dict().items()})
    return result


def _assert_same(expected: dict, actual: dict, context: str) -> None:
    assert expected.keys() == actual.keys(), context
    for key, value in expected.items():
        other = actual[key]
        assert (value is None) == (other is None), f"{context} {key}"
        if value is not None:
            torch.testing.assert_close(other, value, **TOL, msg=lambda m: f"{context} {key}: {m}")


def _compiled_matches_eager(method, kwargs, backend, modes=tuple(MODES)):
    eager = make_layer_model(method, kwargs)
    compiled_model = copy.deepcopy(eager)
    for mode in modes:
        counter = CompileCounterWithBackend(backend)
        compiled = torch.compile(MODES[mode], backend=counter, fullgraph=True)
        for step, shape in enumerate(SHAPES):
            expected = _step(eager, MODES[mode], mode, shape, step, dynamic=False)
            actual = _step(compiled_model, compiled, mode, shape, step, dynamic=True)
            _assert_same(expected, actual, f"{mode} step {step} {shape}:")
        # One graph for the three token counts: no recompilation when only the number of tokens changes.
        assert counter.frame_count == 1, f"{mode}: {counter.frame_count} compilations for {len(SHAPES)} token counts"
    return eager


@pytest.mark.parametrize("case_id, method, kwargs, lf_keys", CASES)
def test_layer_compiles_fullgraph_once_and_matches_eager(case_id, method, kwargs, lf_keys):
    _compiled_matches_eager(method, kwargs, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("case_id, method, kwargs, lf_keys",
                         [c for c in CASES if c.values[0] in INDUCTOR_CASES])
def test_layer_inductor_matches_eager(case_id, method, kwargs, lf_keys):
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fallback_random=True):  # eager's RNG stream for S'MoRE's noisy gates
        _compiled_matches_eager(method, kwargs, "inductor", modes=("train",))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
    return LlamaForCausalLM(config)


def _model_loss(model, ids, mask):
    # use_cache=False as LLaMA-Factory trains (transformers warns, which graph-breaks, when checkpointing drops it)
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False)
    return out.loss


@pytest.mark.parametrize("case_id, method, kwargs, lf_keys",
                         [c for c in CASES if c.values[0] == "moelora-top2"])
def test_checkpointed_tiny_llama_compiles_fullgraph_and_matches_eager(case_id, method, kwargs, lf_keys):
    """What LLaMA-Factory trains: a whole model with non-reentrant gradient checkpointing (transformers' own), aux
    window open, two decoder layers (two checkpoint regions appending to one window: what needed the flat record lists
    of ``core/loss_window.py``); compiled with fullgraph=True it equals eager (loss, aux, every adapter gradient) at two
    sequence lengths. (Recompilation is checked at layer level: transformers' mask and rotary code specialise on the
    sequence length here, which is not ours.)"""
    targets = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    torch.manual_seed(1)
    eager = get_peft_model(_tiny_llama(), METHODS[method].config_cls(target_modules=targets, init_weights=False,
                                                                     **kwargs))
    eager.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    eager.train()
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_model_loss, backend=counter, fullgraph=True)
    for step, seq in enumerate((9, 12)):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(3, 128, (2, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[1, seq - 3:] = 0
        results = []
        for model, fn in ((eager, _model_loss), (compiled_model, compiled)):
            if fn is compiled:
                for t in (ids, mask):
                    torch._dynamo.mark_dynamic(t, 1)
            model.zero_grad(set_to_none=True)
            torch.manual_seed(5)
            with loss_window.collect(token_mask=mask) as window:
                lm = fn(model, ids, mask)
            aux = window.weighted_total()
            (lm + aux if aux is not None else lm).backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
            results.append({"lm": lm.detach(), "aux": aux, **{f"grad:{n}": g for n, g in grads.items()}})
        assert all(v is not None for v in results[0].values() if v is not results[0]["aux"])
        _assert_same(results[0], results[1], f"seq {seq}:")


# -- LLaMA-Factory: `torch_compile: true` ------------------------------------------------------------------------------
_RELOAD_LOGITS = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.load(sys.argv[3])
with torch.no_grad():
    plain = base(ids).logits
    adapted = PeftModel.from_pretrained(base, sys.argv[2]).eval()(ids).logits
torch.save({"base": plain, "adapted": adapted}, sys.argv[4])
"""


def _fresh_process_logits(tiny_model: str, adapter_dir: Path, tmp_path: Path) -> dict:
    """Logits of the base model and of ``PeftModel.from_pretrained(base, adapter_dir)`` in a new interpreter (only the
    startup hook teaches its peft our adapter types)."""
    ids_path, out_path = tmp_path / f"{adapter_dir.name}_ids.pt", tmp_path / f"{adapter_dir.name}_logits.pt"
    torch.save(torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0)), ids_path)
    proc = subprocess.run([sys.executable, "-c", _RELOAD_LOGITS, tiny_model, str(adapter_dir), str(ids_path),
                           str(out_path)], env=BASE_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"ids": torch.load(ids_path), **torch.load(out_path)}


def _logits_of_state(tiny_model: str, adapter_dir: Path, state_file: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the tiny model carrying ``state_file`` (the probe's snapshot of the adapter in training memory)."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    set_peft_model_state_dict(model, load_file(str(state_file)))
    with torch.no_grad():
        return model(ids).logits


def _logged_steps(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


@pytest.mark.slow
def test_llamafactory_cli_trains_compiled_moelora(tiny_model, tiny_data, tmp_path):
    """The real ``llamafactory-cli train`` with ``torch_compile: true`` (inductor, gradient checkpointing on as
    LLaMA-Factory defaults): 3 steps with the aux loss, the adapter saves and a fresh process reloads it."""
    out = tmp_path / "moelora"
    proc = run_cli(["llamafactory-cli", "train"],
                   train_args(tiny_model, tiny_data, str(out), max_steps=3, torch_compile=True), tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-6000:]
    steps = _logged_steps(out)
    assert len(steps) == 3 and all(r["moe_aux_loss"] > 0 for r in steps), steps
    logits = _fresh_process_logits(tiny_model, out, tmp_path)
    assert torch.isfinite(logits["adapted"]).all()
    assert not torch.allclose(logits["adapted"], logits["base"])  # the trained adapter is applied


@pytest.mark.slow
def test_llamafactory_run_exp_trains_every_method_compiled(tiny_model, tiny_data, tmp_path):
    """Every other method (first case of each in ``tests/method_cases.py``) with ``torch_compile: true``, batched in one
    interpreter (``run_exp_many.py``: each run is LLaMA-Factory's ``run_exp``, what the CLI runs), backend
    ``aot_eager`` to keep CI time (the CLI test above and the layer tests cover inductor). Each trains 3 steps; the
    saved adapter, reloaded in a fresh process, gives the logits of the adapter the probe snapshotted in training
    memory at the end. SMoRA also trains eagerly: the compiled run logs the same losses and ends with the same adapter
    (bias included)."""
    from safetensors.torch import load_file

    first = {}
    for case_id, method, _kwargs, lf_keys in METHOD_CASES:
        if method in METHODS and method != "moelora":
            first.setdefault(method, lf_keys)
    common = dict(max_steps=3, moe_num_experts=None, moe_top_k=None, lora_rank=None)
    runs = {method: train_args(tiny_model, tiny_data, str(tmp_path / method), finetuning_type=method,
                               torch_compile=True, torch_compile_backend="aot_eager", **{**common, **keys})
            for method, keys in first.items()}
    runs["smora-eager"] = train_args(tiny_model, tiny_data, str(tmp_path / "smora-eager"), finetuning_type="smora",
                                     **{**common, **first["smora"]})
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"runs": list(runs.values())}))
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "integrations" / "run_exp_many.py"), str(plan)],
                          cwd=tmp_path, env=BASE_ENV, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-6000:]

    for name in runs:
        out = tmp_path / name
        assert len(_logged_steps(out)) == 3, name
        initial = load_file(str(out / "initial_rank0.safetensors"))
        final = load_file(str(out / "final_rank0.safetensors"))
        assert any(not torch.equal(initial[k], final[k]) for k in final), f"{name}: the adapter did not train"
        if name == "smora-eager":
            continue
        logits = _fresh_process_logits(tiny_model, out, tmp_path)
        expected = _logits_of_state(tiny_model, out, out / "final_rank0.safetensors", logits["ids"])
        torch.testing.assert_close(logits["adapted"], expected, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")

    compiled, eager = tmp_path / "smora", tmp_path / "smora-eager"
    for row, ref in zip(_logged_steps(compiled), _logged_steps(eager)):
        assert abs(row["loss"] - ref["loss"]) < 1e-4, (row, ref)
    final_c, final_e = (load_file(str(p / "final_rank0.safetensors")) for p in (compiled, eager))
    assert final_c.keys() == final_e.keys()
    for key in final_e:
        torch.testing.assert_close(final_c[key], final_e[key], **TOL, msg=lambda m: f"{key}: {m}")


@pytest.mark.slow
def test_bench_compiled_mode_reports_kernels_and_spread(tmp_path):
    """``python -m llamafactory_moe.bench --tiny --compile``: every variant compiles (fullgraph) and gets generated
    kernels, kernel functions, compile time and per-round times beside compiled LoRA."""
    out = tmp_path / "compiled"
    proc = subprocess.run([sys.executable, "-m", "llamafactory_moe.bench", "--tiny", "--compile", "--methods",
                           "moelora", "--layer-reps", "2", "--compile-rounds", "2", "--out", str(out)],
                          env=BASE_ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["errors"] == {}
    for label in ("moelora", "lora-r32"):
        entry = result["layers"][label]["64x64"]
        assert entry["kernels"] > 0 and entry["kernel_functions"] > 0 and entry["compile_s"] > 0, entry
        assert len(entry["compiled_s"]) == len(entry["eager_s"]) == 2
    markdown = out.with_suffix(".md").read_text()
    assert "| moelora | lora-r32 |" in markdown and "[" in markdown
