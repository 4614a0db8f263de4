"""Runtime patches that teach stock LLaMA-Factory (0.9.5) our methods. Every patch is one row of ``PATCHES``.

Each module mirrors the LLaMA-Factory module it patches and holds that module's rows, so an upstream change maps to
one file:

=====================  ==========================================================================================
``hparams.py``         ``llamafactory.hparams.parser``: ``FinetuningArguments``, ``_parse_args``,
                       ``_parse_train_args``, ``_parse_infer_args`` (incl. the vLLM / merged-export refusal)
``adapter.py``         ``llamafactory.model.adapter.init_adapter`` (patched in ``llamafactory.model.loader``)
``tuner.py``           ``llamafactory.train.tuner.run_exp``
``callbacks.py``       ``llamafactory.train.callbacks``: ``LogCallback.on_log``; our ``MoeStepCallback``
``ploting.py``         ``llamafactory.extras.ploting.plot_loss``
``trainer.py``         ``llamafactory.train.{sft,pt,dpo,kto,rm}.trainer``: ``compute_loss``, ``log``,
                       ``create_optimizer``
``process_hooks.py``   ``llamafactory.extras.logging`` (its handler) and ``sys.excepthook``; patches nothing
``common.py``          ``VERIFIED`` and the refusal to run when a patch failed
=====================  ==========================================================================================

The patch engine (``integrations/patching.py``) imports nothing of ours: this package passes it the table. The
startup hook (``llamafactory_moe/_autoload.py``) calls ``on_module_imported`` for each module in its
``WATCHED_MODULES``; importing this package checks that those are exactly the modules the rows target (a row for an
unwatched module would silently never apply).

Flow of ``llamafactory-cli train x.yaml`` with ``finetuning_type: smora``:

1. parser: ``MoeFinetuningArguments`` validates our keys (before any model loads); ``_parse_train_args`` then checks
   cross-dataclass settings (stage, gradient checkpointing mode, adapters to resume, data fallback).
2. loader: ``init_adapter`` builds our PEFT model (new adapter) or loads ours unmerged (resume / inference).
3. trainers: ``compute_loss`` opens the aux-loss window, adds the recorded terms with HF's gradient-accumulation
   scaling; ``log`` adds ``moe_*`` metrics (averaged over steps and ranks exactly as HF averages ``loss``) and
   ``lm_loss`` (``loss`` without the aux terms) next to ``loss``.
4. callbacks and plots: ``trainer_log.jsonl``, ``training_lm_loss.png`` and ``training_moe_aux_loss.png`` carry them;
   a trainer callback runs once-per-optimizer-step updates (SMoRA's balancing) after each optimizer step.
"""

from __future__ import annotations

from ..._autoload import WATCHED_MODULES
from ..patching import Patch, apply_patches, check_watched
from . import adapter, callbacks, hparams, ploting, trainer, tuner
from .. import llamaboard  # LlamaBoard rows (integrations/llamaboard.py)
from .adapter import _setup_moe_adapter
from .callbacks import MoeStepCallback
from ...checkpoints import ADAPTER_WEIGHTS, check_adapter_fits, our_method_of, peft_type_of, saved_adapter_shapes
from .common import VERIFIED
from .process_hooks import install_process_hooks
from .trainer import ROUTING_LOG, ROUTING_METRICS, _MoeLogAccumulator, _wrap_compute_loss, _wrap_log

__all__ = [
    "ADAPTER_WEIGHTS", "MoeStepCallback", "PATCHES", "ROUTING_LOG", "ROUTING_METRICS", "VERIFIED", "_MoeLogAccumulator",
    "_setup_moe_adapter", "_wrap_compute_loss", "_wrap_log", "check_adapter_fits",
    "install_process_hooks", "on_module_imported", "our_method_of", "peft_type_of", "saved_adapter_shapes",
    "watched_modules",
]

# The table. Order matters only within a module (the order below is the order of the former single-file table).
PATCHES: list[Patch] = (hparams.PATCHES + adapter.PATCHES + tuner.PATCHES + callbacks.PATCHES + ploting.PATCHES
                        + trainer.PATCHES + llamaboard.LLAMABOARD_PATCHES)


def on_module_imported(module) -> None:
    """Startup-hook entry point (``_autoload.WATCHED_MODULES``): ``module`` has just finished importing."""
    install_process_hooks()  # step 1, once per process: one-line config errors, our INFO logs printed
    apply_patches(PATCHES, module)  # step 2: the rows that target this module


def watched_modules() -> set[str]:
    """The modules the startup hook hands to ``on_module_imported``."""
    hook = f"{__name__}:{on_module_imported.__name__}"
    return {name for name, target in WATCHED_MODULES.items() if target == hook}


check_watched(PATCHES, watched_modules())
