"""Test helper: several LLaMA-Factory trainings in ONE interpreter, each exactly what `llamafactory-cli train` runs.

    python tests/integrations/run_exp_many.py plan.json                    # one process
    torchrun --nproc_per_node 2 tests/integrations/run_exp_many.py plan.json  # what FORCE_TORCHRUN=1 launches

`plan.json` is `{"runs": [<LLaMA-Factory argument dict>, ...]}`. Each run calls `llamafactory.train.tuner.run_exp(args)`,
the function LLaMA-Factory's launcher calls in every torchrun child, so the startup hook, the argument parser, the
trainers and DeepSpeed behave as under the CLI. Running a method matrix in one interpreter pays the slow start-up
(imports, process group, DeepSpeed's CPU communication op) once instead of once per method.

A probe callback writes `probe_rank<R>.json` into each run's output_dir at the start of training: world size, ZeRO
stage, whether every MoE layer is a ZeRO-3 leaf module, and the partitioned vs full shape of one expert weight.
"""

from __future__ import annotations

import gc
import json
import os
import sys

from transformers import TrainerCallback


class Probe(TrainerCallback):
    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import torch.distributed as dist
        from transformers.integrations import is_deepspeed_zero3_enabled

        from llamafactory_moe.core.layer import MoeLoraLayer

        layers = [m for m in model.modules() if isinstance(m, MoeLoraLayer)] if model is not None else []
        info = {
            "world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
            "deepspeed": bool(args.deepspeed),
            "zero3": bool(is_deepspeed_zero3_enabled()),
            "moe_layers": len(layers),
            "z3_leaf": None,
            "partitioned": None,
        }
        if info["zero3"] and layers:
            from deepspeed.utils import z3_leaf_module

            info["z3_leaf"] = all(z3_leaf_module(m) for m in layers)
            param = next(p for p in layers[0].parameters() if p.requires_grad)
            info["partitioned"] = {"local_numel": param.numel(), "full_shape": list(getattr(param, "ds_shape", []))}
        rank = dist.get_rank() if info["world_size"] > 1 else 0
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, f"probe_rank{rank}.json"), "w") as f:
            json.dump(info, f)


def main(plan_path: str) -> None:
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack if a run hangs
    with open(plan_path) as f:
        plan = json.load(f)
    import torch.distributed as dist

    from llamafactory.train.tuner import run_exp

    # LLaMA-Factory destroys the process group at the end of every run (train/tuner.py); re-creating it in the same
    # torchrun children deadlocks in gloo's rendezvous, so it is kept alive between runs and destroyed once at the end.
    destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda *args, **kwargs: None
    try:
        for args in plan["runs"]:
            run_exp(args=dict(args), callbacks=[Probe(args["output_dir"])])
            gc.collect()
    finally:
        dist.destroy_process_group = destroy
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
