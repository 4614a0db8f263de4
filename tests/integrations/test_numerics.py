"""Numerics: every method's layer stays finite (output, aux terms, gradients) on 1e4-scale activations and on exact
routing ties, in fp32, bf16 and fp16; ties are resolved deterministically; bf16 and fp16 training runs on CPU through
LLaMA-Factory for every method.

Precision settings are the ones training uses:
* fp32 and bf16: the whole model in that dtype (bf16 = LLaMA-Factory's `pure_bf16`),
* fp16: base model in fp16, adapters in fp32 (LLaMA-Factory casts trainable parameters to fp32), under
  `torch.autocast("cpu", torch.float16)`, as HF's fp16 training does on a GPU (on CPU, accelerate runs `fp16: true`
  without autocast or a grad scaler; the layer test uses autocast to exercise the GPU's mixed path). fp16's range
  (65504) bounds what an adapter may output: the adapters here are random at 0.01 scale — 0.1 (used for fp32/bf16)
  overflows fp16 in the expert product B(Ax) itself at 1e4 activations, which is the format's range, not a router
  failure.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamafactory_moe.core import loss_window
from llamafactory_moe.core.layer import MoeLoraLayer
from tests.conftest import BASE_ENV, read_jsonl, train_args
from tests.method_cases import METHOD_CASES
from tests.test_matrix import CASES, make_peft

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _randomise(model, scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _layer_for(method: str, kwargs: dict, precision: str):
    model = make_peft(method, kwargs)
    if precision == "fp16":
        _randomise(model, 0.01)
        model.to(torch.float16)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        _randomise(model, 0.1)
        model.to(DTYPES[precision])
    model.train()
    return next(m for m in model.modules() if isinstance(m, MoeLoraLayer))


def _inputs(layer, kind: str, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, layer.in_features, generator=g)
    if kind == "1e4-scale":
        x = x * 1e4
    elif kind == "all-zero":  # every router logit ties (and equals its bias)
        x = torch.zeros_like(x)
    elif kind == "identical-tokens":  # every token ties with every other
        x = x[:1, :1].expand_as(x).clone()
    return x.to(dtype).requires_grad_()


def _forward_backward(layer, x, precision: str):
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    autocast = torch.autocast("cpu", dtype=torch.float16, enabled=precision == "fp16")
    with autocast, loss_window.collect(token_mask=mask) as window:
        y = layer(x)
        total = window.weighted_total()
    loss = y.float().pow(2).mean() * 1e-8 + (total.float() if total is not None else 0.0)
    layer.zero_grad(set_to_none=True)
    loss.backward()
    return y, total


KINDS = ["1e4-scale", "all-zero", "identical-tokens", "zero-router"]


@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("case_id, method, kwargs, lf_keys", CASES)
def test_extreme_activations_and_ties_stay_finite(case_id, method, kwargs, lf_keys, precision):
    for kind in KINDS:
        layer = _layer_for(method, kwargs, precision)
        if kind == "zero-router":  # exact ties in the routing scores of every token
            with torch.no_grad():
                for name, p in layer.named_parameters():
                    if "router" in name or "gate" in name:
                        p.zero_()
        x = _inputs(layer, "random" if kind == "zero-router" else kind, DTYPES[precision])
        torch.manual_seed(1)  # noisy gates / dropout draw the same noise in both passes below
        y, total = _forward_backward(layer, x, precision)
        where = f"{case_id} {precision} {kind}"
        assert torch.isfinite(y).all(), f"{where}: output"
        assert total is None or torch.isfinite(total).all(), f"{where}: aux loss"
        assert torch.isfinite(x.grad).all(), f"{where}: input gradient"
        for name, p in layer.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), f"{where}: gradient of {name}"
        # ties are broken the same way every time (stable ordering)
        x2 = x.detach().clone().requires_grad_()
        torch.manual_seed(1)
        y2, _ = _forward_backward(layer, x2, precision)
        assert torch.equal(y, y2), f"{where}: tie-breaking is not deterministic"


def _one_case_per_method():
    seen, out = set(), []
    for case_id, method, _kwargs, lf_keys in METHOD_CASES:
        if method not in seen:
            seen.add(method)
            out.append((case_id, method, lf_keys))
    return out


@pytest.mark.slow
def test_bf16_and_fp16_training_for_every_method(tiny_model, tiny_data, tmp_path):
    """`bf16: true` (with `use_cpu: true`: transformers refuses bf16 without it on a GPU-less host) and `fp16: true`
    through LLaMA-Factory, 2 steps per method, one interpreter. On CPU, accelerate creates no grad scaler and no fp16
    autocast (accelerator.py: `mixed_precision == "fp16" and device.type != "cpu"`), so `fp16: true` here means an fp16
    base model with fp32 adapters. Both steps must really update the adapter: the Adam state saved in each checkpoint
    counts the optimizer steps taken (a skipped step, e.g. by a grad scaler on overflow, leaves it behind) and the
    weights saved after step 2 differ from those after step 1."""
    runs = []
    for case_id, method, lf_keys in _one_case_per_method():
        for precision, extra in (("bf16", dict(bf16=True, use_cpu=True)), ("fp16", dict(fp16=True))):
            runs.append(train_args(tiny_model, tiny_data, str(tmp_path / f"{case_id}-{precision}"), **{
                "finetuning_type": method, "moe_num_experts": None, "moe_top_k": None, "lora_rank": None,
                "max_steps": 2, "save_steps": 1, **extra,
                **lf_keys}))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"runs": runs}))
    helper = Path(__file__).with_name("run_exp_many.py")
    proc = subprocess.run([sys.executable, str(helper), str(plan)], cwd=tmp_path, env=BASE_ENV, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-6000:]
    from safetensors.torch import load_file

    for run in runs:
        out = Path(run["output_dir"])
        rows = [r for r in read_jsonl(out / "trainer_log.jsonl") if r.get("loss") is not None]
        assert len(rows) == 2, out
        for row in rows:
            assert all(math.isfinite(v) for k, v in row.items() if k == "loss" or k.startswith("moe_")), row
        assert all(torch.isfinite(t.float()).all() for t in load_file(str(out / "adapter_model.safetensors")).values())
        assert all(math.isfinite(e["grad_norm"]) and e["grad_norm"] > 0
                   for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e), out
        for step in (1, 2):  # Adam's own step count: optimizer.step() ran with gradients at every training step
            state = torch.load(out / f"checkpoint-{step}" / "optimizer.pt", weights_only=False)["state"]
            assert state and all(int(s["step"]) == step for s in state.values()), (out, step)
            assert any(s["exp_avg"].abs().sum() > 0 for s in state.values()), (out, step)
        after_1 = load_file(str(out / "checkpoint-1" / "adapter_model.safetensors"))
        after_2 = load_file(str(out / "checkpoint-2" / "adapter_model.safetensors"))
        assert after_1.keys() == after_2.keys()
        assert any(not torch.equal(after_1[k], after_2[k]) for k in after_1), f"{out}: step 2 left the adapter as is"
