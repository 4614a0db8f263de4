"""Test helper: several LLaMA-Factory trainings in ONE interpreter, each exactly what `llamafactory-cli train` runs.

    python tests/integrations/run_exp_many.py plan.json                    # one process
    torchrun --nproc_per_node 2 tests/integrations/run_exp_many.py plan.json  # what FORCE_TORCHRUN=1 launches

`plan.json` is `{"runs": [<LLaMA-Factory argument dict>, ...]}`. Each run calls
`llamafactory.train.tuner.run_exp(args)`, the function LLaMA-Factory's launcher calls in every torchrun child, so the
startup hook, the argument parser, the trainers and DeepSpeed behave as under the CLI. Running a method matrix in one
interpreter pays the slow start-up (imports, process group, DeepSpeed's CPU communication op) once instead of once per
method.

A probe callback writes into each run's output_dir, per rank R:
  * `probe_rank<R>.json`: world size, ZeRO stage, whether every MoE layer is a ZeRO-3 leaf module, the stored shard vs
    the full size of one expert weight and one base weight, the step training started from (`start_step`, > 0 when
    resuming) and the number of optimizer steps this run took (`steps_run`);
  * `initial_rank<R>.safetensors` / `final_rank<R>.safetensors`: the adapter state this rank holds when training starts
    and ends, in the saved adapter's keys (`get_peft_model_state_dict`: trainable weights and buffers such as SMoRA's
    balancing bias), gathered under ZeRO-3. Comparing ranks shows whether replicas drifted.

A run may carry `"rank_overrides": {"1": {...}}`: LLaMA-Factory arguments that only that rank uses (tests use it for
negative controls: a rank that trains on other data, or draws other random noise).

The process exits through the same exit guard as the CLI's torchrun children (registered by our `run_exp` patch,
llamafactory_moe/core/gloo_exit.py), so an abort at exit fails the launch here too.
"""

from __future__ import annotations

import gc
import json
import os
import sys

from transformers import TrainerCallback


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _adapter_state(model) -> dict | None:
    """The adapter as it would be saved (weights and buffers), full-size: gathered when ZeRO-3 partitions it. None for a
    model without a PEFT adapter (full / freeze tuning); a value-head wrapper (stage rm) is looked through."""
    import contextlib

    from peft.utils import get_peft_model_state_dict
    from transformers.integrations import is_deepspeed_zero3_enabled

    model = getattr(model, "pretrained_model", model)  # trl's AutoModelForCausalLMWithValueHead
    if not hasattr(model, "peft_config"):
        return None
    context = contextlib.nullcontext()
    if is_deepspeed_zero3_enabled():
        import deepspeed

        context = deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad])
    with context:  # a collective under ZeRO-3: every rank calls this at the same point
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(model).items()}


class Probe(TrainerCallback):
    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.info: dict = {}

    def _write_info(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, f"probe_rank{_rank()}.json"), "w") as f:
            json.dump(self.info, f)

    def _write_state(self, name: str, model) -> None:
        from safetensors.torch import save_file

        state = _adapter_state(model) if model is not None else None
        if state is not None:
            os.makedirs(self.output_dir, exist_ok=True)
            save_file(state, os.path.join(self.output_dir, f"{name}_rank{_rank()}.safetensors"))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import torch.distributed as dist
        from transformers.integrations import is_deepspeed_zero3_enabled

        from llamafactory_moe.core.layer import MoeLoraLayer

        layers = [m for m in model.modules() if isinstance(m, MoeLoraLayer)] if model is not None else []
        self.info = {
            "world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
            "deepspeed": bool(args.deepspeed),
            "zero3": bool(is_deepspeed_zero3_enabled()),
            "moe_layers": len(layers),
            "z3_leaf": None,
            "partitioned": None,
            "start_step": state.global_step,  # after transformers restored a checkpoint's trainer state
            "steps_run": 0,
        }
        if self.info["zero3"] and layers:
            from deepspeed.utils import z3_leaf_module

            self.info["z3_leaf"] = all(z3_leaf_module(m) for m in layers)
            # The largest expert weight and the base weight of the first MoE layer: the shard this rank stores
            # (ds_tensor) vs the full size, and what the parameter holds outside a forward (0 unless persistent).
            expert = max((p for p in layers[0].parameters() if p.requires_grad), key=lambda p: p.ds_numel)
            base = layers[0].get_base_layer().weight
            self.info["partitioned"] = {
                name: {"shard_numel": p.ds_tensor.numel(), "full_numel": p.ds_numel, "held_numel": p.numel()}
                for name, p in (("expert", expert), ("base", base))}
        self._write_info()
        self._write_state("initial", model)

    def on_step_end(self, args, state, control, **kwargs):
        self.info["steps_run"] += 1

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._write_info()
        self._write_state("final", model)


def main(plan_path: str) -> None:
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack if a run hangs
    with open(plan_path) as f:
        plan = json.load(f)
    import torch.distributed as dist
    from llamafactory.train.tuner import run_exp

    # LLaMA-Factory destroys the default process group at the end of every run (train/tuner.py). The next run would
    # create it again in the same torchrun children, and that fails in gloo's rendezvous: with this patch removed the
    # second run hangs, one rank inside init_process_group -> _create_gloo_process_group while the other has already
    # passed it. A 15-line gloo script under torchrun (init, all_reduce, destroy, init again; no LLaMA-Factory)
    # shows the same: "Connection reset by peer" when nothing references the old group, a hang when something does
    # (as DeepSpeed and DDP do). Likely cause: destroy_process_group() resets torch's group counter, so the new
    # group's rendezvous reuses the old group's keys in torchrun's store and a rank reads its peer's old address.
    # So the group is kept alive between runs and destroyed once at the end.
    destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda *args, **kwargs: None
    try:
        for run in plan["runs"]:
            args = {k: v for k, v in run.items() if k != "rank_overrides"}
            args.update(run.get("rank_overrides", {}).get(os.environ.get("RANK", "0"), {}))
            run_exp(args=args, callbacks=[Probe(args["output_dir"])])
            gc.collect()
    finally:
        dist.destroy_process_group = destroy
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
