"""Scaling out through stock LLaMA-Factory: DeepSpeed ZeRO-2/3 and 2-process torchrun (gloo) for every implemented
method, on the CPU (DeepSpeed's CPU accelerator, gloo + its shared-memory comm op).

CI keeps it small: every method under ZeRO-3 for 2 steps in ONE torchrun launch (`run_exp_many.py`: each run is what
`llamafactory-cli train` runs in a torchrun child), one real `llamafactory-cli train` under ZeRO-2, and the torchrun vs
single-process loss comparison for every method. `LLAMAFACTORY_MOE_FULL_MATRIX=1` adds every method case x {ZeRO-2,
ZeRO-3} through `llamafactory-cli train` itself, and stock LoRA under both stages.

Not run here (no GPU): NCCL, bf16/fp16 DeepSpeed engines (the CPU runs are fp32), ZeRO offload, multi-node.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import BASE_ENV, REPO_ROOT, read_jsonl, run_cli, train_args
from tests.method_cases import METHOD_CASES

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

HELPER = Path(__file__).with_name("run_exp_many.py")
DS_CONFIGS = {"zero2": REPO_ROOT / "configs" / "deepspeed" / "ds_z2_config.json",
              "zero3": REPO_ROOT / "configs" / "deepspeed" / "ds_z3_config.json"}
FULL_MATRIX = os.environ.get("LLAMAFACTORY_MOE_FULL_MATRIX") == "1"


def _cases(one_per_method: bool) -> list[tuple[str, str, dict]]:
    from llamafactory_moe.methods import IMPLEMENTED

    seen, out = set(), []
    for case_id, method, _kwargs, lf_keys in METHOD_CASES:
        if method in IMPLEMENTED and not (one_per_method and method in seen):
            seen.add(method)
            out.append((case_id, method, lf_keys))
    return out


def _args(model: str, data: str, out: Path, method: str, lf_keys: dict, **overrides) -> dict:
    return train_args(model, data, str(out), **{"finetuning_type": method, "moe_num_experts": None,
                                                "moe_top_k": None, "lora_rank": None, **overrides, **lf_keys})


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run_many(runs: list[dict], workdir: Path, nproc: int) -> subprocess.CompletedProcess:
    plan = workdir / f"plan_{nproc}.json"
    plan.write_text(json.dumps({"runs": runs}))
    if nproc == 1:
        argv = [sys.executable, str(HELPER), str(plan)]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                _free_port(), str(HELPER), str(plan)]
    return subprocess.run(argv, cwd=workdir, env=BASE_ENV, capture_output=True, text=True, timeout=1800)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-2000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


def _losses(out: Path) -> list[float]:
    return [row["loss"] for row in read_jsonl(out / "trainer_log.jsonl") if row.get("loss") is not None]


def assert_full_size_adapter_reloads(out: Path, tiny_model: str) -> None:
    """The adapter saved under ZeRO was gathered: every tensor has the shape a fresh, unpartitioned PeftModel built
    from the saved adapter_config.json holds, and it loads with PeftModel.from_pretrained."""
    from peft import PeftConfig, PeftModel, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    saved = load_file(str(out / "adapter_model.safetensors"))
    config = PeftConfig.from_pretrained(str(out))
    expected = get_peft_model_state_dict(get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), config))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert all(v.numel() > 0 and torch.isfinite(v.float()).all() for v in saved.values())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(out)).eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(3, 30).reshape(1, -1)).logits).all()


def _check_ds_run(run: dict, stage: str, tiny_model: str) -> None:
    out = Path(run["output_dir"])
    losses = _losses(out)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), (out, losses)
    for rank in (0, 1):
        probe = json.loads((out / f"probe_rank{rank}.json").read_text())
        assert probe["world_size"] == 2 and probe["deepspeed"] and probe["moe_layers"] > 0, probe
        assert probe["zero3"] == (stage == "zero3"), probe
        if stage == "zero3":
            assert probe["z3_leaf"] is True, "MoE layers must be ZeRO-3 leaf modules"
            full = math.prod(probe["partitioned"]["full_shape"])
            assert probe["partitioned"]["local_numel"] < full, "expert weights must be partitioned across ranks"
    assert_full_size_adapter_reloads(out, tiny_model)


STAGES_IN_ONE_LAUNCH = ["zero3"] + (["zero2"] if FULL_MATRIX else [])


@pytest.mark.parametrize("stage", STAGES_IN_ONE_LAUNCH)
def test_every_method_trains_under_deepspeed(stage, tiny_model, tiny_data, tmp_path):
    runs = [_args(tiny_model, tiny_data, tmp_path / case_id, method, lf_keys, deepspeed=str(DS_CONFIGS[stage]),
                  max_steps=2, per_device_train_batch_size=2, save_steps=2)
            for case_id, method, lf_keys in _cases(one_per_method=not FULL_MATRIX)]
    _ok(_run_many(runs, tmp_path, nproc=2))
    for run in runs:
        _check_ds_run(run, stage, tiny_model)
        # the ZeRO checkpoint carries DeepSpeed's shards next to the gathered adapter
        assert list((Path(run["output_dir"]) / "checkpoint-2").glob("global_step*")), run["output_dir"]


CLI_CASES = [("zero2", "moelora-top2")]
if FULL_MATRIX:
    CLI_CASES = [(stage, case_id) for stage in ("zero2", "zero3") for case_id, _, _ in _cases(False)]
    CLI_CASES += [("zero2", "stock-lora"), ("zero3", "stock-lora")]


@pytest.mark.parametrize("stage, case_id", CLI_CASES, ids=[f"{s}-{c}" for s, c in CLI_CASES])
def test_llamafactory_cli_train_with_deepspeed(stage, case_id, tiny_model, tiny_data, tmp_path):
    """`FORCE_TORCHRUN=1 NPROC_PER_NODE=2 llamafactory-cli train x.yaml` with `deepspeed: ds_zN_config.json`."""
    if case_id == "stock-lora":
        cfg = train_args(tiny_model, tiny_data, str(tmp_path / "out"), finetuning_type="lora", moe_num_experts=None,
                         moe_top_k=None, deepspeed=str(DS_CONFIGS[stage]), max_steps=2, per_device_train_batch_size=2,
                         save_steps=2)
    else:
        case = next(c for c in _cases(False) if c[0] == case_id)
        cfg = _args(tiny_model, tiny_data, tmp_path / "out", case[1], case[2], deepspeed=str(DS_CONFIGS[stage]),
                    max_steps=2, per_device_train_batch_size=2, save_steps=2)
    proc = run_cli(["llamafactory-cli", "train"], cfg, tmp_path,
                   env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "MASTER_PORT": _free_port()})
    _ok(proc)
    out = tmp_path / "out"
    losses = _losses(out)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    if case_id != "stock-lora":
        assert_full_size_adapter_reloads(out, tiny_model)
        assert any(k.startswith("moe_") for row in read_jsonl(out / "trainer_log.jsonl") for k in row)


def test_torchrun_two_processes_match_one_process_for_every_method(tiny_model, tiny_data, tmp_path):
    """Same global batch (2 ranks x 2 = 1 x 4), no shuffling, aux losses off: per-rank balance losses are computed on
    each rank's half batch, so with them on the two runs differ by design (a mean of per-rank balance losses is not
    the balance loss of the whole batch). CI: one case per method; the full matrix: every case."""
    cases = _cases(one_per_method=not FULL_MATRIX)
    common = dict(disable_shuffling=True, max_steps=3, moe_aux_loss_coef=0.0)
    single = [_args(tiny_model, tiny_data, tmp_path / "single" / c, m, k, per_device_train_batch_size=4, **common)
              for c, m, k in cases]
    double = [_args(tiny_model, tiny_data, tmp_path / "double" / c, m, k, per_device_train_batch_size=2, **common)
              for c, m, k in cases]
    _ok(_run_many(single, tmp_path, nproc=1))
    proc = _run_many(double, tmp_path, nproc=2)
    _ok(proc)
    assert "unused parameters" not in proc.stderr.lower()  # sparse routing never trips DDP's reducer
    for (case_id, _, _), one, two in zip(cases, single, double):
        assert json.loads((Path(two["output_dir"]) / "probe_rank1.json").read_text())["world_size"] == 2
        losses_1, losses_2 = _losses(Path(one["output_dir"])), _losses(Path(two["output_dir"]))
        assert len(losses_1) == len(losses_2) == 3, case_id
        # Noisy top-k gating samples Gaussian noise per token while training: 2 ranks draw other numbers than 1
        # process, so those runs agree only loosely (a config value, as configs have no "stochastic routing" flag).
        kwargs = next(c[2] for c in METHOD_CASES if c[0] == case_id)
        tolerance = 1e-2 if kwargs.get("gate_type") == "noisy_topk" else 1e-4
        for a, b in zip(losses_1, losses_2):
            assert abs(a - b) < tolerance, (case_id, losses_1, losses_2)


# ---------------------------------------------------------------------------------------------------------------------
# moe_* metrics: each rank logs its own statistics; the log wrapper averages them across ranks (a collective).
# ---------------------------------------------------------------------------------------------------------------------
def _log_worker(rank: int, port: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    from types import SimpleNamespace

    from accelerate import Accelerator

    from llamafactory_moe.integrations.llamafactory import _MoeLogAccumulator, _wrap_log

    accumulator = _MoeLogAccumulator()
    # rank 0: two steps summing to 2.0 (mean 1.0); rank 1: one step of 3.0. Expected: mean over ranks of per-rank means.
    accumulator.sums = {"moe_aux_loss": [2.0, 3.0][rank], "moe_balance_loss": [1.0, 6.0][rank]}
    accumulator.steps = [2, 1][rank]
    load = [torch.tensor([4.0, 0.0]), torch.tensor([1.0, 1.0])][rank]  # rank 0: one idle expert; rank 1: balanced
    accumulator.routing = {"layer": {"load": load, "mass": load.clone(), "entropy_sum": torch.tensor([0.0, 2.0][rank]),
                                     "tokens": torch.tensor(4.0)}}
    trainer = SimpleNamespace(args=SimpleNamespace(world_size=2, device="cpu"), accelerator=Accelerator(cpu=True))
    trainer.__dict__["_moe_log_accumulator"] = accumulator
    captured = []
    _wrap_log(lambda self, logs, *a, **k: captured.append(dict(logs)), None)(trainer, {"loss": 1.0})
    Path(out_dir, f"logs{rank}.json").write_text(json.dumps(captured[0]))
    import torch.distributed as dist

    dist.destroy_process_group()


def test_moe_metrics_are_averaged_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_log_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    logs = [json.loads((tmp_path / f"logs{r}.json").read_text()) for r in (0, 1)]
    assert logs[0] == logs[1], "every rank logs the same reduced values"
    got = logs[0]
    assert got["moe_aux_loss"] == pytest.approx((1.0 + 3.0) / 2)
    assert got["moe_balance_loss"] == pytest.approx((0.5 + 6.0) / 2)
    assert got["moe_inactive_expert_frac"] == pytest.approx((0.5 + 0.0) / 2)  # one of two experts idle on rank 0
    assert got["moe_load_cv"] == pytest.approx((1.0 + 0.0) / 2)  # per-rank cv of [1, 0] is 1, of [.5, .5] is 0
    assert got["moe_router_entropy"] == pytest.approx((0.0 + 0.5 / math.log(2)) / 2)  # nats per token / log E
    assert got["moe_dropped_expert_frac"] == pytest.approx((0.5 + 0.75) / 2)  # 1 - selections / (tokens * E)
    assert got["loss"] == 1.0
    assert got["lm_loss"] == pytest.approx(1.0 - 2.0)  # the logged loss without the rank-averaged aux terms
    assert list(got)[:2] == ["loss", "lm_loss"]
