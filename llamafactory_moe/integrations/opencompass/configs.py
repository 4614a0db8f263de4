"""Config builders: the ``datasets`` and ``summarizer`` entries of our eval configs.

Mirrors ``opencompass/configs/datasets/`` (one dataset entry per task: reader, prompt template, retriever,
inferencer, evaluator) and ``opencompass/configs/summarizers/`` (summary groups). They return plain dicts naming
classes by dotted path, since a worker only imports what a ``type=`` string names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from .datasets import _flan_path, _flan_short_name, flan_tasks
from .settings import (_COMMONSENSE_ALIASES, _HERE, _OC, ALPACA_PREFIX, ALPACA_SUFFIX, ANSWER_PREFIX, CHOICE_HEADLINE,
                       COMMONSENSE_SOURCE, COMMONSENSE_TASKS, _prompt_round, _reader_cfg, _warn)

# --------------------------------------------------------------------------------------------------------------------
# FLAN-v2 (48 tasks, SMoRA's combined_test.json)
# --------------------------------------------------------------------------------------------------------------------

# The summary shows one headline number per task; ROUGE-L is the usual headline for FLAN's struct-to-text tasks.
FLAN_METRIC_KEYS = {"em": "score", "bleu": "score", "rouge": "rougeL"}
_FLAN_EVALUATORS = {
    "em": f"{_HERE}.FlanEMEvaluator",
    "bleu": f"{_OC}.icl_evaluator.BleuEvaluator",
    "rouge": f"{_OC}.icl_evaluator.RougeEvaluator",
}


def _select(names: list[str], requested: Optional[list[str]], normalise, what: str) -> list[str]:
    if not requested:
        return names
    known = {normalise(n): n for n in names}
    chosen, unknown = [], []
    for item in requested:
        name = known.get(normalise(item))
        (chosen if name else unknown).append(name or item)
    if unknown:
        raise ValueError(f"`MOE_EVAL_TASKS` names unknown {what} {unknown}; choose from {sorted(known)}.")
    return chosen


def flan_datasets(settings: dict) -> list[dict]:
    """One generation dataset per FLAN task, scored with the task's own metric (exact match / BLEU / ROUGE)."""
    path = _flan_path(settings["data_root"])
    datasets = []
    for entry in _selected_flan_tasks(settings):
        task, metric = entry["task"], entry["metric"]
        datasets.append(dict(
            abbr=f"flan-{_flan_short_name(task)}",
            type=f"{_HERE}.FlanTaskDataset",
            path=str(path),
            task=task,
            reader_cfg=_reader_cfg(settings, ["inputs"], "targets"),
            infer_cfg=dict(
                prompt_template=dict(type=f"{_OC}.icl_prompt_template.PromptTemplate",
                                     template=dict(round=[_prompt_round(settings, "inputs")])),
                retriever=dict(type=f"{_OC}.icl_retriever.ZeroRetriever"),
                inferencer=dict(type=f"{_OC}.icl_inferencer.GenInferencer"),
            ),
            eval_cfg=dict(evaluator=dict(type=_FLAN_EVALUATORS[metric]),
                          pred_postprocessor=dict(type=f"{_HERE}.generation_postprocess")),
        ))
    return datasets


def _group_abbr(prefix: str, name: str) -> str:
    return prefix + re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_")


def _selected_flan_tasks(settings: dict) -> list[dict]:
    tasks = {t["task"]: t for t in flan_tasks(settings["data_root"])}
    selected = _select(list(tasks), settings["tasks"], lambda n: _flan_short_name(n.lower()), "FLAN tasks")
    return [tasks[name] for name in selected]


def flan_summarizer(settings: dict) -> dict:
    """Headline metric per task, one average per domain, the average over tasks and the average over domains.

    All groups list ``(dataset, metric)`` pairs, so ROUGE tasks enter the averages with ROUGE-L (OpenCompass would
    otherwise take a dataset's first metric, ROUGE-1). EM, BLEU and ROUGE are all on a 0-100 scale.
    """
    tasks = _selected_flan_tasks(settings)
    rows = [(f"flan-{_flan_short_name(t['task'])}", FLAN_METRIC_KEYS[t["metric"]]) for t in tasks]
    domains: dict[str, list] = {}
    for task, row in zip(tasks, rows):
        domains.setdefault(task["domain"], []).append(row)
    groups = [dict(name=_group_abbr("flan-domain-", domain), subsets=subsets) for domain, subsets in domains.items()]
    groups.append(dict(name="flan-avg", subsets=rows))
    groups.append(dict(name="flan-domain-avg", subsets=[(g["name"], "naive_average") for g in groups[:-1]]))
    return dict(
        type="opencompass.summarizers.DefaultSummarizer",
        dataset_abbrs=[*rows, *[(g["name"], "naive_average") for g in groups]],
        summary_groups=groups,
    )


# --------------------------------------------------------------------------------------------------------------------
# Commonsense (8 tasks, LLM-Adapters format)
# --------------------------------------------------------------------------------------------------------------------

def commonsense_datasets(settings: dict) -> list[dict]:
    """The commonsense tasks that exist under ``<data_root>/commonsense``, in generation, PPL or choice mode.

    ``gen`` reproduces the LLM-Adapters / D2MoRA protocol (greedy generation, first label match, exact accuracy).
    ``ppl`` scores "the correct answer is <label>" for every candidate label and picks the most likely one: one
    forward pass per candidate instead of up to ``max_out_len`` decoding steps, so much cheaper on CPU.
    ``choice`` scores each option's own text as the continuation of the question (see :func:`choice_prompts`), the
    zero-shot protocol of lm-eval-harness; it works for models that were never taught the label vocabulary.
    A task whose test.json is missing is skipped with a message; if none is found, this raises.
    """
    mode = settings["mode"]
    if mode not in {"gen", "ppl", "choice"}:
        raise ValueError(f"`MOE_EVAL_MODE` must be `gen`, `ppl` or `choice`; got {mode!r}.")
    root = Path(settings["data_root"]) / "commonsense"
    names = _select(list(COMMONSENSE_TASKS), settings["tasks"],
                    lambda n: _COMMONSENSE_ALIASES.get(n.lower(), n.lower()), "commonsense tasks")
    datasets, missing = [], []
    for name in names:
        spec = COMMONSENSE_TASKS[name]
        path = root / spec["dir"] / "test.json"
        if not path.is_file():
            missing.append(str(path))
            _warn(f"skipping commonsense task `{name}`: expected {path}, which is missing. It is one of "
                  f"{COMMONSENSE_SOURCE}; nothing is downloaded.")
            continue
        if mode == "choice":
            datasets.append(_choice_dataset(settings, name, path))
            continue
        human = _prompt_round(settings, "instruction")
        if mode == "gen":
            infer_cfg = dict(
                prompt_template=dict(type=f"{_OC}.icl_prompt_template.PromptTemplate",
                                     template=dict(round=[human])),
                retriever=dict(type=f"{_OC}.icl_retriever.ZeroRetriever"),
                inferencer=dict(type=f"{_OC}.icl_inferencer.GenInferencer"),
            )
            eval_cfg = dict(evaluator=dict(type=f"{_OC}.icl_evaluator.AccEvaluator"),
                            pred_postprocessor=dict(type=f"{_HERE}.first_label_match", labels=spec["labels"]))
        else:
            template = {label: dict(round=[human, dict(role="BOT", prompt=ANSWER_PREFIX + label)])
                        for label in spec["ppl_labels"]}
            infer_cfg = dict(
                prompt_template=dict(type=f"{_OC}.icl_prompt_template.PromptTemplate", template=template),
                retriever=dict(type=f"{_OC}.icl_retriever.ZeroRetriever"),
                inferencer=dict(type=f"{_OC}.icl_inferencer.PPLInferencer"),
            )
            eval_cfg = dict(evaluator=dict(type=f"{_OC}.icl_evaluator.AccEvaluator"))
        datasets.append(dict(
            abbr=name if mode == "gen" else f"{name}-ppl",
            type=f"{_HERE}.CommonsenseDataset",
            path=str(path),
            reader_cfg=_reader_cfg(settings, ["instruction"], "answer"),
            infer_cfg=infer_cfg,
            eval_cfg=eval_cfg,
        ))
    if not datasets:
        raise FileNotFoundError(f"no commonsense test data found under {root} (looked for {missing}). Set "
                                f"MOE_EVAL_DATA to the folder holding commonsense/<task>/test.json: "
                                f"{COMMONSENSE_SOURCE}; nothing is downloaded.")
    return datasets


def _choice_dataset(settings: dict, name: str, path: Path) -> dict:
    """One task in choice mode: a prompt per option label, each ending in that option's text.

    The labels are the task's answer vocabulary, so the prediction is directly comparable with the `answer` field.
    Options differ per example, so the template reads them from per-label columns (``ctx_<label>``,
    ``cont_<label>``) that :class:`CommonsenseDataset` fills, the way OpenCompass's own piqa_ppl config reads
    ``{sol1}`` / ``{sol2}``; a label the example does not have (an ARC question with 3 choices) has an empty
    continuation and is not scored.
    """
    labels = COMMONSENSE_TASKS[name]["labels"]
    template = {}
    for label in labels:
        context, continuation = "{ctx_" + label + "}", "{cont_" + label + "}"
        if settings["chat_template"]:
            # The context is the user turn; the option is the assistant's reply.
            template[label] = dict(round=[dict(role="HUMAN", prompt=context),
                                          dict(role="BOT", prompt=continuation)])
        elif settings["prompt"] == "alpaca":
            template[label] = ALPACA_PREFIX + context + ALPACA_SUFFIX + continuation
        else:
            template[label] = context + continuation
    columns = [f"{kind}_{label}" for label in labels for kind in ("ctx", "cont")]
    return dict(
        abbr=f"{name}-choice",
        type=f"{_HERE}.CommonsenseDataset",
        path=str(path),
        task=name,
        reader_cfg=_reader_cfg(settings, columns, "answer"),
        infer_cfg=dict(
            prompt_template=dict(type=f"{_OC}.icl_prompt_template.PromptTemplate", template=template),
            retriever=dict(type=f"{_OC}.icl_retriever.ZeroRetriever"),
            inferencer=dict(type=f"{_HERE}.ChoiceLLInferencer"),
        ),
        eval_cfg=dict(evaluator=dict(type=f"{_HERE}.ChoiceAccEvaluator")),
    )


def commonsense_summarizer(datasets: list[dict]) -> dict:
    """Accuracy per task and its average. Choice mode lists each task's headline metric (:data:`CHOICE_HEADLINE`,
    averaged into `commonsense-avg`), then below the average the other metric of every task."""
    rows, extra = [], []
    for d in datasets:
        if "task" not in d:
            rows.append((d["abbr"], "accuracy"))
            continue
        headline = CHOICE_HEADLINE.get(d["task"], "acc_norm")
        rows.append((d["abbr"], headline))
        extra.append((d["abbr"], "acc" if headline == "acc_norm" else "acc_norm"))
    return dict(
        type="opencompass.summarizers.DefaultSummarizer",
        dataset_abbrs=[*rows, ("commonsense-avg", "naive_average"), *extra],
        summary_groups=[dict(name="commonsense-avg", subsets=rows)],
    )
