"""``llamafactory-moe compare <preset.yaml>``: train several methods on the same data, evaluate each, one table.

For every run of the preset, in order:

1. write the merged LLaMA-Factory yaml to ``<out>/<name>/train.yaml`` and run the stock ``llamafactory-cli train`` on
   it (a real subprocess, timed; log in ``<out>/<name>/train.log``);
2. count the trainable parameters in the saved ``adapter_model.safetensors`` (method buffers such as GOAT's initial
   SVD slices or SMoRA's balancing bias are saved there too but are not trained, so they are left out);
3. run ``opencompass eval_configs/<config> --debug`` with the ``MOE_*`` environment variables pointing at the base
   model and the adapter (work dir ``<out>/<name>/eval``, log ``<out>/<name>/eval.log``) and read its summary CSV;
4. write ``<out>/<name>/DONE.json`` with the results.

A run whose ``DONE.json`` exists and was made from the same settings is skipped, so an interrupted comparison resumes
where it stopped; a run directory without ``DONE.json`` (interrupted or failed) is deleted and redone. A failing run
is reported (run, step, log) and the others still run, unless ``--fail-fast``. At the end ``comparison.md``,
``comparison.json`` and ``curves.png`` (LM loss and aux loss per method, read from each ``trainer_log.jsonl``) are
written from every ``DONE.json`` and the table is printed.

The preset format is documented in ``configs/compare/README.md``; :func:`load_preset` validates it.

Modules, as in ``llamafactory_moe/bench/``: ``preset`` (loading, validation, :class:`PresetError`, resolving paths),
``runner`` (the train / eval subprocesses, resume, :class:`StepFailed`, the command), ``report`` (``comparison.md``,
``comparison.json``, ``curves.png``). Every public name is re-exported here.
"""

from __future__ import annotations

# ruff: noqa: F401  (the names outside __all__ are re-exported for `from llamafactory_moe.compare import ...` too)
from .preset import (EVAL_KEYS, REQUIRED_KEYS, RESERVED_TRAIN_KEYS, TOP_LEVEL_KEYS, Preset, PresetError, Run, eval_env,
                     load_preset, resolve_dataset_dir, resolve_model, train_config)
from .report import build_table, markdown_table, plot_curves, read_curves, skipped_tasks, write_outputs
from .runner import (DONE_FILE, StepFailed, add_parser, evaluate_run, read_summary, run_compare, train_run,
                     trainable_parameters)

__all__ = ["Preset", "PresetError", "load_preset", "run_compare", "trainable_parameters"]
