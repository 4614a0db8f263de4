"""Scaling out through stock LLaMA-Factory: DeepSpeed ZeRO-2/3 and 2-process torchrun (gloo) for every implemented
method, on the CPU (DeepSpeed's CPU accelerator, gloo + its shared-memory comm op).

What is compared: the final adapter weights (and buffers such as SMoRA's balancing bias), not logged losses. Every run
trains the same 3 optimizer steps on the same 12 samples in the same order (`disable_shuffling`, seed 0, global batch
4), so each layout has to end at the same weights:
  * 2 ranks under ZeRO-2 and under ZeRO-3 vs plain 2-process DDP (aux losses on: each rank computes its balance loss on
    the same micro-batch in both layouts);
  * plain 2-process DDP vs 1 process (aux losses off: a mean of per-rank balance losses is not the balance loss of the
    whole batch, so with them on the two differ by design);
  * a ZeRO-3 run resumed from its step-2 checkpoint vs the uninterrupted run.
Tolerance: max |difference| over every adapter tensor <= ATOL = 5e-6 (measured: ZeRO-2 vs DDP 0 to 1.5e-7, ZeRO-3 vs
DDP <= 8.1e-7, 2 vs 1 process <= 1.8e-7, resume 0), while 3 steps move each trainable tensor by ~2e-3 (Adam, lr 1e-3).
Negative controls run beside them: rank 1 training on other data (must not match 1 process), rank 1 drawing other
noise in S'MoRE's noisy gate (must not match), the step-2 checkpoint (must not match the final weights).

CI launches: one launch per configuration through `run_exp_many.py` (each run is LLaMA-Factory's own `run_exp`, what
`llamafactory-cli train` runs in every torchrun child): 1 process, DDP, ZeRO-2, ZeRO-3 (+ resume); and one real
`FORCE_TORCHRUN=1 NPROC_PER_NODE=2 llamafactory-cli train` per ZeRO stage, compared with the same DDP runs.
`LLAMAFACTORY_MOE_FULL_MATRIX=1` runs every method case instead of one per method.

Not run here (no GPU): NCCL, bf16/fp16 DeepSpeed engines (the CPU runs are fp32), ZeRO offload, multi-node.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from functools import cache
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
ATOL = 5e-6  # max |a - b| over every adapter tensor for runs that must end equal
MOVED = 100 * ATOL  # a trained adapter moved more than this from its start
REJECT = 10 * ATOL  # a negative control differs by more than this from the run it must not match
STEPS, GLOBAL_BATCH = 3, 4


def _cases(one_per_method: bool) -> list[tuple[str, str, dict]]:
    seen, out = set(), []
    for case_id, method, _kwargs, lf_keys in METHOD_CASES:
        if not (one_per_method and method in seen):
            seen.add(method)
            out.append((case_id, method, lf_keys))
    return out


def _draws_noise(case_id: str) -> bool:
    """A gate that samples random noise while training (a config value: configs have no "stochastic routing" flag)."""
    return next(kwargs for c, _, kwargs, _ in METHOD_CASES if c == case_id).get("gate_type") == "noisy_topk"


CASES = _cases(one_per_method=not FULL_MATRIX)
# The DeepSpeed comparison adds the noisy gates: both layouts draw the same noise on each rank (same seed, same rank),
# so they must match exactly too. The 1-process comparison cannot include them: 1 process draws the noise of 4 samples
# from one stream, 2 ranks draw it for 2 samples each from two streams of the same seed.
NOISY = [c for c in _cases(False) if _draws_noise(c[0])]
DS_CASES = CASES + [c for c in NOISY if c not in CASES]
if FULL_MATRIX:
    DS_CASES.append(("stock-lora", "lora", {"lora_rank": 4}))
ONE_VS_TWO_CASES = [c for c in CASES if c not in NOISY]
CLI_CASES = [("zero2", "smora"), ("zero3", "goat-top2")]


def _args(model: str, data: str, out: Path, method: str, lf_keys: dict, **overrides) -> dict:
    common = dict(finetuning_type=method, moe_num_experts=None, moe_top_k=None, lora_rank=None, max_steps=STEPS,
                  disable_shuffling=True, save_strategy="no")
    return train_args(model, data, str(out), **{**common, **lf_keys, **overrides})  # e.g. aux losses off wins


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run_many(runs: list[dict], workdir: Path, nproc: int) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    plan = workdir / "plan.json"
    plan.write_text(json.dumps({"runs": runs}))
    if nproc == 1:
        argv = [sys.executable, str(HELPER), str(plan)]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                _free_port(), str(HELPER), str(plan)]
    proc = subprocess.run(argv, cwd=workdir, env=BASE_ENV, capture_output=True, text=True, timeout=1800, check=False)
    (workdir / "stdout.txt").write_text(proc.stdout)
    (workdir / "stderr.txt").write_text(proc.stderr)
    return proc


def _ok(proc: subprocess.CompletedProcess) -> None:
    """Exit status 0, and no rank aborted at exit (the gloo teardown abort: llamafactory_moe/core/gloo_exit)."""
    assert proc.returncode == 0, \
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-2000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    assert "terminate called" not in proc.stderr, proc.stderr[-3000:]


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return _load(out / "adapter_model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Max |a - b| over every tensor; the two must hold the same keys and shapes."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    assert all(a[k].shape == b[k].shape for k in a), [k for k in a if a[k].shape != b[k].shape][:5]
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@cache
def _buffer_suffixes() -> tuple[str, ...]:
    from llamafactory_moe.core.peft_types import METHODS

    return tuple(f".{name}" for spec in METHODS.values() for name in spec.model_cls.tuner_layer_cls.buffer_names)


# Trainable tensors that get no gradient by construction: D2MoRA's down-router with ONE down-expert is a softmax over a
# single logit, the constant 1 (full matrix only).
NO_GRADIENT = {("d2mora-one-down-expert", "d2mora_router_down")}


def assert_trained(initial: dict[str, torch.Tensor], final: dict[str, torch.Tensor], case_id: str, where) -> None:
    """Training ran: every kind of trainable tensor (A, B, router, ...) changed in at least one layer (a layer whose
    experts are never switched on in 3 steps, e.g. under AdaMoLE's high threshold with aux losses off, may keep its
    router), the adapter moved by more than MOVED (so ATOL cannot mistake an untrained adapter for a trained one), and
    SMoRA's balancing bias (a buffer) moved too."""
    where = (where, case_id)
    assert initial.keys() == final.keys(), where
    trainable = [k for k in final if not k.endswith(_buffer_suffixes())]
    assert trainable, where
    kinds: dict[str, bool] = {}
    for k in trainable:
        kind = k.rsplit(".", 1)[-1]
        kinds[kind] = kinds.get(kind, False) or not torch.equal(final[k], initial[k])
    frozen = [kind for kind, changed in kinds.items() if not changed and (case_id, kind) not in NO_GRADIENT]
    assert not frozen, (where, frozen)
    assert max_diff({k: final[k] for k in trainable}, {k: initial[k] for k in trainable}) > MOVED, where
    for k in (k for k in final if k.endswith(".smora_bias")):
        assert not torch.equal(final[k], initial[k]), (where, k, "SMoRA's balancing bias never moved")


def assert_ranks_agree(out: Path) -> None:
    """Both ranks hold the same adapter (weights and buffers) at the end: replicas never drift."""
    rank0, rank1 = _load(out / "final_rank0.safetensors"), _load(out / "final_rank1.safetensors")
    assert max_diff(rank0, rank1) == 0, out
    assert max_diff(rank0, _adapter(out)) == 0, (out, "the saved adapter is not rank 0's final state")


def _probe(out: Path, rank: int) -> dict:
    return json.loads((out / f"probe_rank{rank}.json").read_text())


def assert_full_size_adapter_reloads(outs: list[Path], tiny_model: str) -> None:
    """The adapters saved under ZeRO were gathered: in ONE fresh process (nothing of the training processes), every
    tensor has the shape a fresh, unpartitioned PeftModel built from the saved adapter_config.json holds,
    PeftModel.from_pretrained loads it, the loaded adapter holds exactly the saved tensors, and it changes the base
    model's logits."""
    script = textwrap.dedent("""
        import json, sys, torch
        from peft import PeftConfig, PeftModel, get_peft_model
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        base, results = sys.argv[1], {}
        for out in sys.argv[2:]:
            saved = load_file(out + "/adapter_model.safetensors")
            fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(base), PeftConfig.from_pretrained(out))
            expected = {k: list(v.shape) for k, v in get_peft_model_state_dict(fresh).items()}
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
            loaded = get_peft_model_state_dict(model)
            ids = torch.arange(3, 30).reshape(1, -1)
            with torch.no_grad():
                logits = model(input_ids=ids).logits
                with model.disable_adapter():
                    base_logits = model(input_ids=ids).logits
            results[out] = {
                "saved": {k: list(v.shape) for k, v in saved.items()}, "expected": expected,
                "loaded_equal": loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved),
                "finite": bool(torch.isfinite(logits).all()),
                "changes_base": bool((logits - base_logits).abs().max() > 0),
                "nonempty": all(v.numel() > 0 for v in saved.values())}
        print(json.dumps(results))
    """)
    proc = subprocess.run([sys.executable, "-c", script, tiny_model, *map(str, outs)], env=BASE_ENV,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(map(str, outs))
    for out, got in results.items():
        assert got["saved"] == got["expected"], out
        assert got["nonempty"] and got["loaded_equal"] and got["finite"] and got["changes_base"], (out, got)


# ---------------------------------------------------------------------------------------------------------------------
# One launch per configuration, shared by the tests below (module scope: a test run alone launches what it needs).
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def launches(tiny_model, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("scaling_out")
    cache: dict[str, tuple[subprocess.CompletedProcess, Path]] = {}

    def other_data() -> str:
        """The same instructions with other answers: rank 1 of a negative control trains on it."""
        folder = root / "other_data"
        if not folder.exists():
            folder.mkdir()
            rows = json.loads((Path(tiny_data) / "tiny.json").read_text())
            (folder / "tiny.json").write_text(json.dumps([{**r, "output": str(int(r["output"]) + 7)} for r in rows]))
            (folder / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
        return str(folder)

    def plan(name: str) -> tuple[list[dict], int]:
        folder = root / name
        half = dict(per_device_train_batch_size=GLOBAL_BATCH // 2)
        if name == "single":
            return [_args(tiny_model, tiny_data, folder / c, m, k, per_device_train_batch_size=GLOBAL_BATCH,
                          moe_aux_loss_coef=0.0) for c, m, k in ONE_VS_TWO_CASES], 1
        if name == "ddp":
            runs = [_args(tiny_model, tiny_data, folder / "aux_on" / c, m, k, **half) for c, m, k in DS_CASES]
            runs += [_args(tiny_model, tiny_data, folder / "aux_off" / c, m, k, moe_aux_loss_coef=0.0, **half)
                     for c, m, k in ONE_VS_TWO_CASES]
            # Negative controls: rank 1 trains on other data; rank 1 draws other gate noise (seed 1: DDP broadcasts
            # rank 0's initial weights and nothing else in these runs is random, so only the noise differs).
            c, m, k = next(x for x in ONE_VS_TWO_CASES if x[1] == "smora")
            control = _args(tiny_model, tiny_data, folder / "control_data" / c, m, k, moe_aux_loss_coef=0.0, **half)
            control["rank_overrides"] = {"1": {"dataset_dir": other_data()}}
            runs.append(control)
            for c, m, k in NOISY[:1]:
                noise = _args(tiny_model, tiny_data, folder / "control_noise" / c, m, k, **half)
                noise["rank_overrides"] = {"1": {"seed": 1}}
                runs.append(noise)
            return runs, 2
        stage = name
        runs = [_args(tiny_model, tiny_data, folder / c, m, k, deepspeed=str(DS_CONFIGS[stage]), **half,
                      **(dict(save_strategy="steps", save_steps=2) if stage == "zero3" and m == "smora" else {}))
                for c, m, k in DS_CASES]
        if stage == "zero3":
            c, m, k = next(x for x in DS_CASES if x[1] == "smora")
            runs.append(_args(tiny_model, tiny_data, folder / "resumed" / c, m, k, deepspeed=str(DS_CONFIGS[stage]),
                              resume_from_checkpoint=str(folder / c / "checkpoint-2"), **half))
        return runs, 2

    def launch(name: str) -> Path:
        if name not in cache:
            runs, nproc = plan(name)
            cache[name] = (_run_many(runs, root / name, nproc), root / name)
        proc, folder = cache[name]
        _ok(proc)
        return folder

    return launch


def _ddp_reference(launch, case_id: str) -> Path:
    return launch("ddp") / "aux_on" / case_id


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_every_method_under_deepspeed_matches_ddp(stage, launches, tiny_model):
    """Every method, 2 CPU ranks, ZeRO-2 / ZeRO-3: exit 0, DeepSpeed really ran at that stage (partitioned leaf modules
    under ZeRO-3), the weights moved, the saved adapter is full-size and reloads, both ranks agree, and the final
    adapter equals plain 2-process DDP's on the same data within ATOL."""
    folder = launches(stage)
    for case_id, method, _ in DS_CASES:
        out = folder / case_id
        for rank in (0, 1):
            probe = _probe(out, rank)
            assert probe["world_size"] == 2 and probe["deepspeed"], (case_id, probe)
            assert probe["zero3"] == (stage == "zero3") and probe["steps_run"] == STEPS, (case_id, probe)
            assert (probe["moe_layers"] > 0) == (method != "lora"), (case_id, probe)
            if stage == "zero3" and method != "lora":
                assert probe["z3_leaf"] is True, "MoE layers must be ZeRO-3 leaf modules"
                for name, part in probe["partitioned"].items():  # each rank stores half (rounded up) of the weight
                    assert part["shard_numel"] == math.ceil(part["full_numel"] / 2) < part["full_numel"], (name, part)
                assert probe["partitioned"]["base"]["held_numel"] == 0, "the base weight is released outside forward"
        final = _adapter(out)
        assert_trained(_load(out / "initial_rank0.safetensors"), final, case_id, stage)
        assert_ranks_agree(out)
        reference = _ddp_reference(launches, case_id)
        assert max_diff(_load(reference / "initial_rank0.safetensors"), _load(out / "initial_rank0.safetensors")) == 0
        diff = max_diff(final, _adapter(reference))
        assert diff <= ATOL, (stage, case_id, diff)
    assert_full_size_adapter_reloads([folder / case_id for case_id, _, _ in DS_CASES], tiny_model)
def test_zero3_resume_from_checkpoint_matches_the_uninterrupted_run(launches):
    """SMoRA under ZeRO-3 (its balancing bias is a buffer the checkpoint must restore): a run resumed from the step-2
    checkpoint of the uninterrupted run starts at step 2, trains only step 3, and ends at the same adapter."""
    folder = launches("zero3")
    case_id = next(c for c, m, _ in DS_CASES if m == "smora")
    full, resumed = folder / case_id, folder / "resumed" / case_id
    checkpoint = full / "checkpoint-2"
    assert list(checkpoint.glob("global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt")), "no ZeRO-3 shards"
    for rank in (0, 1):
        assert _probe(full, rank)["start_step"] == 0 and _probe(full, rank)["steps_run"] == STEPS
        probe = _probe(resumed, rank)
        assert probe["zero3"] and probe["start_step"] == 2 and probe["steps_run"] == STEPS - 2, probe
    logged = [row["current_steps"] for row in read_jsonl(resumed / "trainer_log.jsonl") if "loss" in row]
    assert logged == [3], logged  # only step 3 was trained and logged
    assert_ranks_agree(resumed)
    diff = max_diff(_adapter(resumed), _adapter(full))
    assert diff <= ATOL, diff
    # Negative control: the checkpoint's own adapter is one step short, and the comparison must tell.
    assert max_diff(_adapter(checkpoint), _adapter(full)) > REJECT


def test_torchrun_two_processes_match_one_process_for_every_method(launches):
    """Same global batch (2 ranks x 2 = 1 x 4), same order, aux losses off: 2 DDP processes end at the 1-process
    adapter.
    SMoRA's bias is updated from counts all-reduced over ranks, so it equals the 1-process bias exactly and both ranks
    hold the same bias. Negative controls: rank 1 training on other data, rank 1 drawing other gate noise."""
    single, ddp = launches("single"), launches("ddp")
    assert "unused parameters" not in (ddp / "stderr.txt").read_text().lower()  # sparse routing never trips DDP
    for case_id, method, _ in ONE_VS_TWO_CASES:
        one, two = single / case_id, ddp / "aux_off" / case_id
        assert _probe(one, 0)["world_size"] == 1 and not (one / "probe_rank1.json").exists()
        assert _probe(two, 0)["world_size"] == _probe(two, 1)["world_size"] == 2
        assert _probe(two, 1)["steps_run"] == STEPS
        assert_trained(_load(two / "initial_rank0.safetensors"), _adapter(two), case_id, "ddp")
        assert_ranks_agree(two)
        diff = max_diff(_adapter(one), _adapter(two))
        assert diff <= ATOL, (case_id, diff)
        for key in (k for k in _adapter(two) if k.endswith(".smora_bias")):
            assert torch.equal(_adapter(one)[key], _adapter(two)[key]), key

    # Negative control 1: rank 1 trains on other answers. The comparison rejects it; DDP still keeps both replicas,
    # and SMoRA's bias, identical although each rank counted its own tokens.
    c = next(c for c, m, _ in ONE_VS_TWO_CASES if m == "smora")
    control = ddp / "control_data" / c
    assert max_diff(_adapter(single / c), _adapter(control)) > REJECT
    assert_ranks_agree(control)
    bias = [k for k in _adapter(control) if k.endswith(".smora_bias")]
    assert bias and any(not torch.equal(_adapter(control)[k], _adapter(ddp / "aux_off" / c)[k]) for k in bias), \
        "other data on rank 1 should change the all-reduced counts, hence the bias"

    # Negative control 2 (the noisy gate of the DeepSpeed comparison): the same run with other noise on rank 1 does
    # not match, so the exact DDP == ZeRO match of that case shows both layouts drew the same noise.
    for noisy, _, _ in NOISY[:1]:
        assert max_diff(_adapter(ddp / "control_noise" / noisy), _adapter(ddp / "aux_on" / noisy)) > REJECT


def _zero_checkpoint_stage(out: Path) -> tuple[int, int]:
    """ZeRO stage and partition count DeepSpeed recorded in rank 1's optimizer shard of the last checkpoint."""
    shard = next(out.glob(f"checkpoint-{STEPS}/global_step{STEPS}/zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    state = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    count = state["partition_count"]
    return int(state["zero_stage"]), int(count[0] if isinstance(count, (list, tuple)) else count)


@pytest.mark.parametrize("stage, case_id", CLI_CASES, ids=[f"{s}-{c}" for s, c in CLI_CASES])
def test_llamafactory_cli_train_with_deepspeed(stage, case_id, launches, tiny_model, tiny_data, tmp_path):
    """The real command: `FORCE_TORCHRUN=1 NPROC_PER_NODE=2 llamafactory-cli train x.yaml` with `deepspeed:
    ds_zN_config.json`. Exit status 0 (no rank aborts at exit), DeepSpeed ran at that stage with 2 partitions, the
    adapter moved, is full-size, reloads, and equals the same run under plain DDP within ATOL."""
    method, lf_keys = next((m, k) for c, m, k in DS_CASES if c == case_id)
    out = tmp_path / "out"
    cfg = _args(tiny_model, tiny_data, out, method, lf_keys, deepspeed=str(DS_CONFIGS[stage]),
                per_device_train_batch_size=GLOBAL_BATCH // 2, save_strategy="steps", save_steps=1000)
    proc = run_cli(["llamafactory-cli", "train"], cfg, tmp_path,
                   env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "MASTER_PORT": _free_port()}, timeout=900)
    _ok(proc)
    assert _zero_checkpoint_stage(out) == ((2 if stage == "zero2" else 3), 2)
    reference = _ddp_reference(launches, case_id)
    final = _adapter(out)
    assert_trained(_load(reference / "initial_rank0.safetensors"), final, case_id, ("cli", stage))
    diff = max_diff(final, _adapter(reference))
    assert diff <= ATOL, (stage, case_id, diff)
    assert any(k.startswith("moe_") for row in read_jsonl(out / "trainer_log.jsonl") for k in row)
    assert_full_size_adapter_reloads([out], tiny_model)


# ---------------------------------------------------------------------------------------------------------------------
# The exit guard: a gloo worker thread still releasing its last tensor when Python finalizes aborts the process.
# ---------------------------------------------------------------------------------------------------------------------
EXIT_SCRIPT = textwrap.dedent("""
    import os, sys, time, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    if sys.argv[1] == "guard":
        from llamafactory_moe.core.gloo_exit import register_exit_guard
        register_exit_guard()  # what the run_exp patch does
    rank = dist.get_rank()
    world = dist.group.WORLD  # a reference outliving destroy_process_group, as DDP's and DeepSpeed's do
    t = torch.ones(10)
    for _ in range(3):
        dist.all_reduce(t)  # the worker threads have run, as after any training
    x = torch.ones(1000) * 2
    if rank == 1:
        work = dist.all_reduce(x, async_op=True)
        del work  # only the gloo worker holds the work, and a reference to x
        dist.destroy_process_group()  # LLaMA-Factory's teardown; the worker threads keep running
        start = time.perf_counter()
        sum(range(1_000_000))
        n = int(1_000_000 * 2.0 / (time.perf_counter() - start))
        open("holding", "w").close()
        sum(range(n))  # ONE C call holding the GIL ~2 s; rank 0 joins meanwhile and the worker waits for the GIL
    else:
        while not os.path.exists("holding"):
            time.sleep(0.01)
        time.sleep(0.3)
        dist.all_reduce(x)
        dist.destroy_process_group()
""")


def _exit_run(mode: str, workdir: Path) -> subprocess.CompletedProcess:
    script = workdir / "exit_script.py"
    script.write_text(EXIT_SCRIPT)
    (workdir / "holding").unlink(missing_ok=True)
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
            str(script), mode]
    return subprocess.run(argv, cwd=workdir, env={**BASE_ENV, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True,
                          text=True, timeout=300, check=False)


def test_gloo_exit_guard_prevents_the_abort_at_exit(tmp_path):
    """A rank whose gloo worker still has to release a finished collective's tensor when the interpreter finalizes
    aborts ("terminate called without an active exception", SIGABRT). With the exit guard it exits 0.
    Negative control: the same script without the guard must abort within 5 tries (it aborted in 16 of 20 runs
    here, and 0 of 20 with the guard)."""
    aborted = False
    for _ in range(5):
        proc = _exit_run("noguard", tmp_path)
        aborted = proc.returncode != 0 and "terminate called without an active exception" in proc.stderr
        if aborted:
            break
    assert aborted, "the unguarded script never aborted: this test no longer reproduces the failure"
    for _ in range(2):
        proc = _exit_run("guard", tmp_path)
        assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr[-3000:]


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
