"""What ``torch.compile`` needs to know about our layers: one dynamo setting, applied when a model gets our adapters.

Every method's layer compiles with ``fullgraph=True`` (no graph break) in training, with aux-loss and routing windows
open, and in eval (``tests/test_compile.py``). The one thing dynamo cannot decide alone is non-reentrant activation
checkpointing (what LLaMA-Factory forces, see ``core/loss_window.py``): dynamo traces ``torch.utils.checkpoint`` as a
higher-order op and, by default, refuses a side effect inside it (the layer's ``loss_window.record_term`` appending to
the open window, SMoRA storing its per-step rank counts), because eager checkpointing would replay that side effect when
it recomputes the forward during ``backward()``. Ours never replays: the recomputation runs after the trainer closed
the window, so it records nothing (that is the window's design). Dynamo's
``skip_fwd_side_effects_in_bwd_under_checkpoint`` says exactly that: apply the forward's side effects once, do not
replay them in the recomputation. Without it, every checkpointed decoder layer of a compiled model graph-breaks and
runs eagerly.
"""

from __future__ import annotations


def configure_dynamo() -> None:
    """Let compiled non-reentrant checkpointing keep our layers' recording side effects out of the recomputation,
    as eager checkpointing does (module docstring). Idempotent; a torch without the setting is left alone."""
    try:
        import torch._dynamo.config as dynamo_config
    except ImportError:  # pragma: no cover - torch without dynamo
        return
    if hasattr(dynamo_config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
