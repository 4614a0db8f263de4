"""Routing statistics in a real `llamafactory-cli train` run, and `llamafactory-moe analyze` on its adapter (real
subprocesses, tiny model, the packaged multi-task moe_demo data)."""

from __future__ import annotations

import json
import math
import statistics
import subprocess

import pytest

from llamafactory_moe.data import demo_data_dir
from tests.conftest import BASE_ENV, read_jsonl, run_cli, train_args

pytestmark = pytest.mark.slow

ROUTING_SCALARS = ("moe_load_cv", "moe_router_entropy", "moe_dropped_expert_frac", "moe_inactive_expert_frac",
                   "moe_expert_similarity")


def _assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, \
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """4 HydraLoRA steps (a dense router: its load CV used to be 0 by construction), logging every 2 steps."""
    work = tmp_path_factory.mktemp("analyze")
    out = work / "out"
    cfg = train_args(tiny_model, str(demo_data_dir()), str(out), finetuning_type="hydralora", moe_top_k=None,
                     moe_num_experts=3, lora_rank=2, dataset="moe_demo", max_steps=4, logging_steps=2,
                     lora_target="q_proj,v_proj,down_proj")
    _assert_ok(run_cli(["llamafactory-cli", "train"], cfg, work))
    return out, work


def test_training_logs_routing_scalars_and_per_layer_file(trained):
    out, _ = trained
    step_logs = [row for row in read_jsonl(out / "trainer_log.jsonl") if "loss" in row]
    assert len(step_logs) == 2
    for row in step_logs:
        assert all(key in row for key in ROUTING_SCALARS), row
        assert row["moe_load_cv"] > 0  # load from the gate mass, not a constant all-experts count
        assert row["moe_dropped_expert_frac"] == 0.0 and 0 < row["moe_router_entropy"] <= 1
    rows = read_jsonl(out / "moe_routing_log.jsonl")
    assert [row["step"] for row in rows] == [2, 4]
    layers = rows[-1]["layers"]
    assert len(layers) == 2 * 3  # two decoder layers x three targeted modules
    for stats in layers.values():
        assert len(stats["load"]) == 3 and sum(stats["load"]) == pytest.approx(1.0, abs=1e-5)
        assert stats["load_basis"] == "mass" and stats["tokens"] > 0 and 0 <= stats["expert_similarity"] <= 1
    mean_cv = sum(s["load_cv"] for s in layers.values()) / len(layers)
    assert step_logs[-1]["moe_load_cv"] == pytest.approx(mean_cv, abs=1e-5)  # one process: no rank averaging
    mean_entropy = sum(s["router_entropy"] for s in layers.values()) / len(layers)
    assert step_logs[-1]["moe_router_entropy"] == pytest.approx(mean_entropy, abs=1e-5)
    for stats in layers.values():  # recomputed from the saved load vector alone
        load = stats["load"]
        assert stats["load_cv"] == pytest.approx(statistics.pstdev(load) / statistics.fmean(load), abs=1e-5)
        # mean per-token gate entropy <= entropy of the mean gate (= load, concavity), both over log E
        load_entropy = -sum(p * math.log(p) for p in load if p > 0) / math.log(len(load))
        assert 0 < stats["router_entropy"] <= load_entropy + 1e-5, stats


def test_analyze_writes_figures_and_numbers_per_task(trained, tiny_model):
    out, work = trained
    analysis = work / "analysis"
    proc = subprocess.run(["llamafactory-moe", "analyze", "--model", tiny_model, "--adapter", str(out), "--dataset",
                           "moe_demo", "--template", "llama3", "--max-samples", "3", "--output-dir", str(analysis)],
                          cwd=work, env=BASE_ENV, capture_output=True, text=True, timeout=300)
    _assert_ok(proc)
    for name in ("routing_heatmaps.png", "load_histograms.png", "expert_similarity.png", "layer_overview.png"):
        assert (analysis / name).stat().st_size > 20_000, name  # a drawn figure, not an empty canvas
    result = json.loads((analysis / "analysis.json").read_text())
    assert result["method"] == "hydralora" and result["task_column"] == "task"
    tasks = {row["task"] for row in json.loads((demo_data_dir() / "moe_demo.json").read_text())}
    assert set(result["tasks"]) == tasks
    assert len(result["layers"]) == 6
    for task in result["tasks"].values():
        assert task["samples"] == 3 and set(task["layers"]) == set(result["layers"])
        assert all(len(stats["load"]) == 3 for stats in task["layers"].values())
        assert task["overall"]["moe_load_cv"] > 0
    assert set(result["expert_similarity"]) == set(result["layers"])
    assert all(len(s["matrix"]) == 3 for s in result["expert_similarity"].values())


@pytest.mark.parametrize("case", ["missing_adapter", "not_ours", "unknown_dataset"])
def test_analyze_errors_are_one_line(case, trained, tiny_model, tmp_path, capsys, monkeypatch):
    # In-process (the same `main` the console script runs): each error is raised before any model loads, and a
    # subprocess per case would spend its time importing LLaMA-Factory.
    from llamafactory_moe.cli import main

    out, _ = trained
    adapter, dataset = str(out), "moe_demo"
    if case == "missing_adapter":
        adapter, expected = str(tmp_path / "nope"), "no such directory"
    elif case == "not_ours":
        (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
        adapter, expected = str(tmp_path), "is a LORA adapter, not a llamafactory-moe MoE-LoRA adapter"
    else:
        dataset, expected = "no_such_set", "--dataset no_such_set: not in"
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", "--model", tiny_model, "--adapter", adapter, "--dataset", dataset]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llamafactory-moe analyze: ") and expected in lines[0], lines
