"""Once-per-optimizer-step updates of non-trainable adapter state, synchronised across data-parallel ranks.

Layers that balance load without a loss (SMoRA) count expert usage during the training forwards of one optimizer step
and update a buffer afterwards. Doing it here, rather than inside ``forward``, makes the update independent of gradient
accumulation (one update per optimizer step), of gradient checkpointing (recomputed forwards do not count) and of the
data-parallel layout (counts are all-reduced, so every rank applies the same update and replicas never drift).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .layer import MoeLoraLayer


def apply_optimizer_step_updates(model: nn.Module) -> int:
    """Reduce every layer's step statistics in ONE all-reduce and hand them back. Returns the number of layers updated.

    Must be called on every rank at the same point (it is a collective when distributed).
    """
    layers = [m for m in model.modules() if isinstance(m, MoeLoraLayer)]
    pending = [(layer, layer.step_statistics()) for layer in layers]
    pending = [(layer, stats) for layer, stats in pending if stats]
    if not pending:
        return 0
    flat = torch.cat([t.reshape(-1).float() for _, stats in pending for t in stats])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        backend = dist.get_backend()
        # NCCL needs the tensor on the rank's GPU; gloo on the CPU.
        if backend == "nccl" and torch.cuda.is_available():
            device_flat = flat.cuda()
            dist.all_reduce(device_flat)
            flat = device_flat.to(flat.device)
        else:
            flat = flat.cpu()
            dist.all_reduce(flat)
    offset = 0
    for layer, stats in pending:
        reduced = []
        for t in stats:
            n = t.numel()
            reduced.append(flat[offset:offset + n].view_as(t).to(t.device))
            offset += n
        layer.apply_step_statistics(reduced)
    return len(pending)
