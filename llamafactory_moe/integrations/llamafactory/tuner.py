"""Mirrors ``llamafactory.train.tuner`` (patched there: ``run_exp``): add our once-per-optimizer-step callback (the CLI
offers no way to pass callbacks) and wait at exit for gloo's worker threads.
"""

from __future__ import annotations

from ..patching import Patch
from .callbacks import MoeStepCallback
from .common import VERIFIED


def _wrap_run_exp(original, module):
    def run_exp(args=None, callbacks=None):
        from ...core.gloo_exit import register_exit_guard

        # LLaMA-Factory's destroy_process_group() leaves gloo's worker threads running (DeepSpeed and DDP keep the
        # groups referenced); one still releasing its last tensor when Python finalizes aborts the process (SIGABRT,
        # "terminate called without an active exception"). The guard waits for them at exit (gloo_exit.py).
        register_exit_guard()
        callbacks = list(callbacks or [])
        callbacks.append(MoeStepCallback())
        return original(args=args, callbacks=callbacks)

    return run_exp


PATCHES: list[Patch] = [
    Patch("run_exp", "llamafactory.train.tuner", "run_exp", _wrap_run_exp,
          "add the once-per-optimizer-step callback (the CLI offers no way to pass callbacks); wait at exit for "
          "gloo's worker threads (else a rank can abort after training)", VERIFIED,
          ("args", "callbacks")),
]
