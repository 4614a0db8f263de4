"""Trainer callbacks. Mirrors ``llamafactory.train.callbacks``: our ``MoeStepCallback`` (added by the ``run_exp``
patch in ``tuner.py``) and the ``LogCallback.on_log`` patch that carries ``lm_loss`` and the ``moe_*`` metrics into
``trainer_log.jsonl``.
"""

from __future__ import annotations

from transformers import TrainerCallback

from ...core.step_hooks import apply_optimizer_step_updates
from ..patching import Patch
from .common import VERIFIED


class MoeStepCallback(TrainerCallback):
    """Runs once-per-optimizer-step adapter updates (e.g. SMoRA's loss-free bias) on every rank."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            apply_optimizer_step_updates(model)


def _wrap_log_callback_on_log(original, module):
    def on_log(self, args, state, control, **kwargs):
        last = state.log_history[-1] if state.log_history else {}
        extra = {k: v for k, v in last.items() if k == "lm_loss" or k.startswith("moe_")}
        if not extra:
            return original(self, args, state, control, **kwargs)
        write = type(self)._write_log
        # LogCallback hard-codes its keys and writes from a thread pool; a per-call closure carries ours along.
        self._write_log = lambda output_dir, logs: write(self, output_dir, {**logs, **extra})
        try:
            return original(self, args, state, control, **kwargs)
        finally:
            del self._write_log

    return on_log


PATCHES: list[Patch] = [
    Patch("log_callback", "llamafactory.train.callbacks", "LogCallback.on_log", _wrap_log_callback_on_log,
          "write lm_loss and moe_* metrics into trainer_log.jsonl (LogCallback hard-codes its keys)", VERIFIED,
          ("self", "args", "state", "control")),
]
