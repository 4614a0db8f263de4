"""OpenCompass support: dataset loaders, answer extraction, model wrappers and config builders for our eval configs.

The configs in ``eval_configs/`` stay thin and call the builders here; this package is also what OpenCompass worker
processes import, so it is where our PEFT types get registered before ``PeftModel.from_pretrained`` runs.

Two facts about OpenCompass 0.5.4 shape this package:

* A config's ``from x import y`` lines are *not executed* (mmengine parses them lazily and dumps only plain values),
  and a worker only imports what a dotted ``type=`` string names. So every class referenced from a config is named
  by its dotted path in this package, and importing this package imports ``llamafactory_moe`` (whose import hook
  registers our PEFT types) in the worker.
* The configs import this package with ``importlib.import_module`` so they can *call* the builders at parse time;
  the builders return only plain dicts and strings, which mmengine can dump and reload.

Nothing here downloads data or models. Import this package only where OpenCompass is installed
(``pip install llamafactory-moe[eval]``); ``llamafactory_moe/__init__.py`` never imports it.

Modules, each after the OpenCompass module(s) it mirrors: ``settings`` (the ``MOE_*`` variables, task tables, the
model entry), ``configs`` (dataset and summarizer entries, as ``opencompass/configs/``), ``datasets`` (loaders and
option parsing, as ``opencompass.datasets``), ``inferencers`` (choice mode, as ``opencompass.openicl.icl_inferencer``),
``evaluators`` (postprocessors and evaluators, as ``opencompass.utils.text_postprocessors`` and
``opencompass.openicl.icl_evaluator``), ``models`` (model wrappers, as ``opencompass.models``). Every public name is
re-exported here: configs name classes and functions as ``llamafactory_moe.integrations.opencompass.<name>``, and
importing this package registers them all in OpenCompass's registries.
"""

from __future__ import annotations

import llamafactory_moe  # noqa: F401,I001  (installs the hook that registers our PEFT types when peft is imported)

# ruff: noqa: F401  (the names outside __all__, constants and helpers, are re-exported for old imports too)
from .configs import (FLAN_METRIC_KEYS, commonsense_datasets, commonsense_summarizer, flan_datasets,
                      flan_summarizer)
from .datasets import CommonsenseDataset, FlanTaskDataset, choice_prompts, commonsense_options, flan_tasks
from .evaluators import ChoiceAccEvaluator, FlanEMEvaluator, first_label_match, generation_postprocess
from .inferencers import ChoiceLLInferencer
from .models import MoeHFBaseModel, MoeHFChatModel, chat_meta_template
from .settings import (ALPACA_PREFIX, ALPACA_SUFFIX, ANSWER_PREFIX, CHOICE_HEADLINE, CHOICE_OPTION_WORDS,
                       COMMONSENSE_SOURCE, COMMONSENSE_TASKS, FLAN_FILE, FLAN_SOURCE, model_config, settings_from_env)

__all__ = [
    "COMMONSENSE_TASKS",
    "ChoiceAccEvaluator",
    "ChoiceLLInferencer",
    "CommonsenseDataset",
    "FlanEMEvaluator",
    "FlanTaskDataset",
    "MoeHFBaseModel",
    "MoeHFChatModel",
    "choice_prompts",
    "commonsense_datasets",
    "commonsense_options",
    "commonsense_summarizer",
    "first_label_match",
    "flan_datasets",
    "flan_summarizer",
    "generation_postprocess",
    "model_config",
    "settings_from_env",
]
