"""The benchmark harness in tiny mode: it runs end to end and reports every implemented method.

Timings are not asserted (CI machines are noisy); the op counts are, since they do not depend on the machine: a
method's aten ops per layer forward + backward must not grow with the number of experts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "tiny"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    # Few repetitions: the test checks completeness, not speed.
    cmd = [sys.executable, "-m", "llamafactory_moe.bench", "--tiny", "--train-steps", "2", "--layer-reps", "2",
           "--gen-reps", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.with_suffix(".json").is_file(), f"no JSON written:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads(out.with_suffix(".json").read_text())
    assert proc.returncode == 0, f"variants failed: {result['errors']}\n{proc.stderr[-5000:]}"
    return result, out.with_suffix(".md").read_text()


def test_every_implemented_method_is_reported(tiny_run):
    from llamafactory_moe.bench.cases import BENCH_CASES
    from llamafactory_moe.core.peft_types import METHODS, register_all_methods

    register_all_methods()
    result, markdown = tiny_run
    assert set(result["methods"]) == set(METHODS)
    for method in METHODS:
        if method not in BENCH_CASES:
            assert f"`{method}`: no bench config" in markdown
            continue
        for case in BENCH_CASES[method]:
            assert f"| {case.label} " in markdown, f"no table row for {case.label}"
    assert result["errors"] == {}


def test_table_is_complete(tiny_run):
    result, markdown = tiny_run
    measured = ("train_step", "layer_fwd_bwd", "ops", "peak_memory", "generate")
    for case in result["cases"]:
        for key in ("vs_rank", "vs_params"):
            comparison = case[key]
            for metric in measured:
                assert comparison["ratios"][metric] is not None, (case["label"], key, metric)
                assert comparison["pass"][metric] in (True, False)
    assert "n/a" not in markdown.split("### Absolute")[0]


def test_op_count_does_not_grow_with_experts(tiny_run):
    result, _ = tiny_run
    e_small, e_large = result["settings"]["ops_experts"]
    for case in result["cases"]:
        for key in ("ops", "kernel_ops"):
            ops = result["variants"][case["label"]][key]
            if case["experts_fields"]:
                assert ops[str(e_small)] == ops[str(e_large)], (case["label"], key, ops)


def test_every_method_is_free_of_host_syncs(tiny_run):
    result, _ = tiny_run
    for case in result["cases"]:
        assert result["variants"][case["label"]]["host_syncs"] == {}, case["label"]


def test_kernel_ops_exclude_exactly_the_views():
    import torch

    from llamafactory_moe.bench.measure import AtenOpCounter, is_view_op

    aten = torch.ops.aten
    for op in (aten.view.default, aten.t.default, aten.expand.default, aten.detach.default, aten.slice.Tensor,
               aten._unsafe_view.default):
        assert is_view_op(op), op
    for op in (aten.mm.default, aten.mul.Tensor, aten.add_.Tensor, aten.scatter_.value, aten._to_copy.default,
               aten.clone.default):
        assert not is_view_op(op), op
    a = torch.randn(3, 4)
    with AtenOpCounter() as counter:  # t, unsqueeze, expand, detach: views; mul, add_: kernels
        (a.t().unsqueeze(0).expand(2, 4, 3) * 2).detach().add_(1)
    assert counter.total == 6 and counter.kernels == 2, counter.counts


def test_profile_script_separates_a_methods_extra_ops_from_loras():
    """scripts/profile_compiled_layer.py (the profile the README's compiled misses cite) runs on a clean interpreter and
    shows what S'MoRE adds to LoRA: its router's second GEMM over the input and more layout copies."""
    script = REPO / "scripts" / "profile_compiled_layer.py"
    out = subprocess.run([sys.executable, str(script), "lora", "smore-1layer"], capture_output=True, text=True,
                         timeout=600, check=True).stdout
    lora, smore = out.split("### lora:")[1].split("### smore-1layer:")
    biased_input_gemm = "| `aten::addmm` | [[32], [1024, 576], [576, 32]"  # x @ W.T + b to 32 wide: biased, not LoRA
    assert biased_input_gemm in smore and biased_input_gemm not in lora
    assert "| `aten::mm` | [[1024, 576], [576, 32]" in lora  # LoRA's A, unbiased

    def calls(section: str, op: str) -> int:
        return int(next(line for line in section.splitlines() if line.startswith(f"| `{op}` |")).split("|")[2])

    assert calls(smore, "aten::addmm") > calls(lora, "aten::addmm")
    assert calls(smore, "aten::copy_") > calls(lora, "aten::copy_")
