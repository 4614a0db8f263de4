"""OpenCompass support: dataset loaders, answer extraction, model wrappers and config builders for our eval configs.

The configs in ``eval_configs/`` stay thin and call the builders here; this module is also what OpenCompass worker
processes import, so it is where our PEFT types get registered before ``PeftModel.from_pretrained`` runs.

Two facts about OpenCompass 0.5.4 shape this module (specs/opencompass-integration.md §1.4, §4):

* A config's ``from x import y`` lines are *not executed* (mmengine parses them lazily and dumps only plain values),
  and a worker only imports what a dotted ``type=`` string names. So every class referenced from a config is named
  by its dotted path in this module, and importing this module imports ``llamafactory_moe`` (whose import hook
  registers our PEFT types) in the worker.
* The configs import this module with ``importlib.import_module`` so they can *call* the builders at parse time;
  the builders return only plain dicts and strings, which mmengine can dump and reload.

Nothing here downloads data or models. Import this module only where OpenCompass is installed
(``pip install llamafactory-moe[eval]``); ``llamafactory_moe/__init__.py`` never imports it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

import llamafactory_moe  # noqa: F401  (installs the hook that registers our PEFT types when peft is imported)
from datasets import Dataset
from opencompass.datasets.base import BaseDataset
from opencompass.models import HuggingFaceBaseModel, HuggingFacewithChatTemplate
from opencompass.models.base import LMTemplateParser
from opencompass.openicl.icl_evaluator import BaseEvaluator, EMEvaluator
from opencompass.openicl.icl_inferencer.icl_base_inferencer import BaseInferencer
from opencompass.registry import ICL_EVALUATORS, ICL_INFERENCERS, LOAD_DATASET, MODELS, TEXT_POSTPROCESSORS

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

_HERE = f"{__name__}"  # dotted prefix for `type=` strings, e.g. 'llamafactory_moe.integrations.opencompass.X'
_OC = "opencompass.openicl"

FLAN_FILE = "flan/combined_test.json"
FLAN_SOURCE = ("the 48-task FLAN-v2 test mix `datasets/combined_test.json` from the SMoRA repository "
               "(https://github.com/StyxXuan/smora)")
COMMONSENSE_SOURCE = ("the LLM-Adapters test sets `dataset/<task>/test.json` "
                      "(https://github.com/AGI-Edgerunners/LLM-Adapters)")

# LLaMA-Factory's `alpaca` template and the LLM-Adapters evaluation prompt render the same text (minus the 16-space
# indentation artefact of LLM-Adapters, specs/methods_d2mora_goat_adamole.md §1.5), so one prompt serves adapters
# trained with either.
ALPACA_PREFIX = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n")
ALPACA_SUFFIX = "\n\n### Response:\n"

# Commonsense tasks in the LLM-Adapters layout. `labels` is the regex vocabulary of the first-match extraction
# (specs/methods_d2mora_goat_adamole.md §1.6-1.7); `ppl_labels` the candidates scored in PPL mode, which must be one
# fixed list per task: ARC rows with 3 or 5 choices (7 of 1172 in ARC-c, 11 of 2376 in ARC-e) are scored against
# answer1..answer4.
COMMONSENSE_TASKS: dict[str, dict] = {
    "boolq": dict(dir="boolq", labels=["true", "false"], ppl_labels=["true", "false"]),
    "piqa": dict(dir="piqa", labels=["solution1", "solution2"], ppl_labels=["solution1", "solution2"]),
    "siqa": dict(dir="social_i_qa", labels=[f"answer{i}" for i in range(1, 6)],
                 ppl_labels=["answer1", "answer2", "answer3"]),
    "hellaswag": dict(dir="hellaswag", labels=[f"ending{i}" for i in range(1, 5)],
                      ppl_labels=[f"ending{i}" for i in range(1, 5)]),
    "winogrande": dict(dir="winogrande", labels=["option1", "option2"], ppl_labels=["option1", "option2"]),
    "arc-c": dict(dir="ARC-Challenge", labels=[f"answer{i}" for i in range(1, 6)],
                  ppl_labels=[f"answer{i}" for i in range(1, 5)]),
    "arc-e": dict(dir="ARC-Easy", labels=[f"answer{i}" for i in range(1, 6)],
                  ppl_labels=[f"answer{i}" for i in range(1, 5)]),
    "obqa": dict(dir="openbookqa", labels=[f"answer{i}" for i in range(1, 6)],
                 ppl_labels=[f"answer{i}" for i in range(1, 5)]),
}
# The directory names of LLM-Adapters and a few common spellings, all accepted by MOE_EVAL_TASKS.
_COMMONSENSE_ALIASES = {
    **{spec["dir"].lower(): name for name, spec in COMMONSENSE_TASKS.items()},
    "social_iqa": "siqa", "arc_c": "arc-c", "arc_e": "arc-e", "arc-challenge": "arc-c", "arc-easy": "arc-e",
    "openbookqa": "obqa",
}
# LLM-Adapters' training target is "the correct answer is <label>", so PPL mode scores exactly that continuation.
ANSWER_PREFIX = "the correct answer is "
# Choice mode: the word that numbers the options in each task's LLM-Adapters instruction ("Solution1: ...",
# "Answer2: ...", "Ending3: ...", "Option1: ..."); the label of option k is this word in lower case plus k, which is
# exactly the task's `answer` field. BoolQ lists no options: its two answers are the labels themselves.
CHOICE_OPTION_WORDS = {"piqa": "Solution", "siqa": "Answer", "hellaswag": "Ending", "winogrande": "Option",
                       "arc-c": "Answer", "arc-e": "Answer", "obqa": "Answer"}
# Choice mode's headline metric: `acc_norm` (log-likelihood per byte of the option) where options are free texts of
# different lengths, so a long option is not penalised for its length. BoolQ's two options are the fixed words
# " true" / " false": dividing by their byte counts (5 vs 6) only adds a constant bias towards "false" (SmolLM2-135M:
# acc_norm 31% vs acc 52% on the first 100), so BoolQ's headline is `acc`, as lm-eval-harness reports it. WinoGrande
# scores the same continuation for both options, where the two metrics coincide.
CHOICE_HEADLINE = {"boolq": "acc"}


# --------------------------------------------------------------------------------------------------------------------
# Settings from the environment
# --------------------------------------------------------------------------------------------------------------------

def _env(name: str) -> Optional[str]:
    value = os.environ.get(name, "").strip()
    return value or None


def _env_int(name: str, default: Optional[int]) -> Optional[int]:
    value = _env(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"`{name}` must be an integer; got {value!r}.") from None


def _env_bool(name: str) -> bool:
    value = (_env(name) or "0").lower()
    if value not in {"0", "1", "true", "false", "yes", "no", "on", "off"}:
        raise ValueError(f"`{name}` must be 0 or 1; got {value!r}.")
    return value in {"1", "true", "yes", "on"}


def _has_tokenizer(path: str | os.PathLike) -> bool:
    return (Path(path) / "tokenizer_config.json").is_file()


def _default_base_model() -> Optional[str]:
    # The project's offline demo model (`python -m llamafactory_moe.models`), if it has been prepared.
    from llamafactory_moe._cache import cache_root

    entry = cache_root() / "smollm2-135m-instruct"
    return str(entry) if (entry / "config.json").is_file() else None


def _default_data_root(config_dir: str) -> Optional[str]:
    # Configs live in <repo>/eval_configs; the shared data sits next to the repository as ../shared/data.
    candidate = Path(config_dir).resolve().parent.parent / "shared" / "data"
    return str(candidate) if candidate.is_dir() else None


def settings_from_env(config_dir: str, *, default_max_out_len: int, needs_data: bool = True) -> dict:
    """Read the ``MOE_*`` environment variables (documented at the top of each config) into a plain dict.

    Raises ``ValueError`` / ``FileNotFoundError`` with the variable name and the fix, so a bad setting fails while the
    config is parsed, before any model is loaded.
    """
    base_model = _env("MOE_BASE_MODEL") or _default_base_model()
    if base_model is None:
        raise ValueError("`MOE_BASE_MODEL` is not set: point it at the base model directory the adapter was trained "
                         "on (e.g. MOE_BASE_MODEL=/models/Llama-3-8B-Instruct), or run "
                         "`python -m llamafactory_moe.models` once to use the offline SmolLM2-135M-Instruct demo.")
    base_model = str(Path(base_model).expanduser())
    if not (Path(base_model) / "config.json").is_file():
        raise FileNotFoundError(f"`MOE_BASE_MODEL` ({base_model}) has no config.json; point it at a Hugging Face "
                                "model directory (nothing is downloaded).")

    adapter = _env("MOE_ADAPTER")
    if adapter is not None:
        adapter = str(Path(adapter).expanduser().resolve())
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"`MOE_ADAPTER` ({adapter}) has no adapter_config.json; point it at the "
                                    "`output_dir` of `llamafactory-cli train`, or unset it to evaluate the base model.")

    data_root = _env("MOE_EVAL_DATA") or _default_data_root(config_dir)
    if data_root is None and needs_data:
        raise FileNotFoundError("`MOE_EVAL_DATA` is not set and no ../shared/data directory was found next to the "
                                "repository; set MOE_EVAL_DATA to the folder holding flan/ and commonsense/.")

    num_gpus = _env_int("MOE_NUM_GPUS", None)
    if num_gpus is None:
        import torch

        num_gpus = 1 if torch.cuda.is_available() else 0
    limit = _env_int("MOE_EVAL_LIMIT", None)
    if limit is not None and limit < 1:
        raise ValueError(f"`MOE_EVAL_LIMIT` must be >= 1 (or unset for all examples); got {limit}.")
    mode = (_env("MOE_EVAL_MODE") or "gen").lower()
    # Choice mode scores option text as a plain continuation (lm-eval-harness style), so it defaults to no wrapper.
    prompt = (_env("MOE_PROMPT") or ("plain" if mode == "choice" else "alpaca")).lower()
    if prompt not in {"alpaca", "plain"}:
        raise ValueError(f"`MOE_PROMPT` must be `alpaca` or `plain`; got {prompt!r}.")
    tasks = _env("MOE_EVAL_TASKS")

    source = adapter or base_model
    return dict(
        base_model=base_model,
        adapter=adapter,
        abbr=_env("MOE_MODEL_ABBR") or Path(source).name,
        data_root=str(Path(data_root).expanduser().resolve()) if data_root else None,
        batch_size=_env_int("MOE_EVAL_BATCH_SIZE", 8),
        max_out_len=_env_int("MOE_MAX_OUT_LEN", default_max_out_len),
        max_seq_len=_env_int("MOE_MAX_SEQ_LEN", None),
        num_gpus=num_gpus,
        limit=limit,
        chat_template=_env_bool("MOE_CHAT_TEMPLATE"),
        prompt=prompt,
        tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
        mode=mode,
    )


def model_config(settings: dict, *, needs_ppl: bool = False) -> dict:
    """The OpenCompass model entry for ``settings``: our chat wrapper for generation with the tokenizer's chat
    template, our base wrapper otherwise (PPL scoring exists only on the base wrapper, which then renders the chat
    template itself)."""
    use_chat_class = settings["chat_template"] and not needs_ppl
    entry = dict(
        type=f"{_HERE}.{'MoeHFChatModel' if use_chat_class else 'MoeHFBaseModel'}",
        abbr=settings["abbr"],
        path=settings["base_model"],
        peft_path=settings["adapter"],
        max_out_len=settings["max_out_len"],
        max_seq_len=settings["max_seq_len"],
        batch_size=settings["batch_size"],
        run_cfg=dict(num_gpus=settings["num_gpus"]),
    )
    if not use_chat_class:
        entry["chat_template"] = settings["chat_template"]
        if not settings["chat_template"] and settings["prompt"] == "alpaca":
            # A base model keeps writing the next "### Instruction:" block; stopping there saves most of the
            # generation time on CPU.
            entry["stop_words"] = ["### "]
    return entry


def _prompt_round(settings: dict, column: str) -> dict:
    """The HUMAN turn for one instruction column. With the chat template the model wrapper adds the turn markup."""
    if settings["chat_template"] or settings["prompt"] == "plain":
        text = "{" + column + "}" if settings["chat_template"] else "{" + column + "}\n"
    else:
        text = ALPACA_PREFIX + "{" + column + "}" + ALPACA_SUFFIX
    return dict(role="HUMAN", prompt=text)


def _reader_cfg(settings: dict, input_columns: list[str], output_column: str) -> dict:
    cfg = dict(input_columns=input_columns, output_column=output_column)
    if settings["limit"] is not None:
        cfg["test_range"] = f"[0:{settings['limit']}]"
    return cfg


def _warn(message: str) -> None:
    print(f"[llamafactory-moe] WARNING: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# FLAN-v2 (48 tasks, SMoRA's combined_test.json)
# --------------------------------------------------------------------------------------------------------------------

def _flan_short_name(task: str) -> str:
    return task[: -len("_10templates")] if task.endswith("_10templates") else task


def _flan_path(data_root: str) -> Path:
    path = Path(data_root) / FLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"FLAN test data not found: expected {path} (set MOE_EVAL_DATA to the folder that "
                                f"holds {FLAN_FILE}). It is {FLAN_SOURCE}; nothing is downloaded.")
    return path


def flan_tasks(data_root: str) -> list[dict]:
    """``[{task, domain, metric, count}]`` in file order, read from ``combined_test.json``."""
    seen: dict[str, dict] = {}
    for row in json.loads(_flan_path(data_root).read_text(encoding="utf-8")):
        entry = seen.setdefault(row["task"], dict(task=row["task"], domain=row["domain"], metric=row["metric"],
                                                  count=0))
        entry["count"] += 1
    return list(seen.values())


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


# --------------------------------------------------------------------------------------------------------------------
# Choice mode: options parsed out of the LLM-Adapters instructions, scored by the likelihood of their text
# --------------------------------------------------------------------------------------------------------------------

_INSTRUCTION_HEAD = re.compile(r"^Please (?:choose|answer) [^:]*: ")
_BOOLQ = re.compile(r"^Please answer the following question with true or false, question: (?P<q>.*?)\s*"
                    r"Answer format: true/false\s*$", re.DOTALL)


def commonsense_options(task: str, instruction: str) -> tuple[str, list[str]]:
    """``(question, [option1, option2, ...])`` of one LLM-Adapters instruction; option k has label `<word>k`.

    The instruction is "Please choose the correct ...: <question>\n\n<Word>1: <text> <Word>2: <text> ...
    Answer format: <word>1/<word>2/...". The answer-format line says how many options there are; the text must
    hold exactly the markers <Word>1..<Word>k in order, which guards against an option that itself contains
    "Answer2: ".
    """
    if task == "boolq":
        match = _BOOLQ.match(instruction)
        if not match:
            raise ValueError(f"not a BoolQ instruction in the LLM-Adapters format: {instruction[:200]!r}")
        return match["q"].strip(), ["true", "false"]
    if task not in CHOICE_OPTION_WORDS:
        raise ValueError(f"`task` {task!r} has no option format; choose from {['boolq', *CHOICE_OPTION_WORDS]}.")
    word = CHOICE_OPTION_WORDS[task]
    head = _INSTRUCTION_HEAD.match(instruction)
    body, _, answer_format = instruction.rpartition("Answer format:")
    count = len(answer_format.strip().split("/"))
    if not head or not body:
        raise ValueError(f"not a {task} instruction in the LLM-Adapters format: {instruction[:200]!r}")
    pieces = re.split(rf"(?:^|\s){word}(\d+): ", body[head.end():])
    numbers = [int(n) for n in pieces[1::2]]
    if numbers != list(range(1, count + 1)):
        raise ValueError(f"expected options {word}1..{word}{count} in order, found {numbers} in {instruction[:200]!r}")
    return pieces[0].strip(), [text.strip() for text in pieces[2::2]]


def _hellaswag_clean(text: str) -> str:
    # HellaSwag's WikiHow contexts carry "[title]" / "[step]" / "[header]" markers; like lm-eval-harness we turn
    # "[title]" into a sentence break (without doubling a period already there) and drop the rest, so the model
    # scores prose rather than markup.
    text = re.sub(r"\.?\s*\[title\]\s*", ". ", text.strip())
    text = re.sub(r"\[.*?\]", "", text)
    return re.sub(r"  +", " ", text).strip()


def choice_prompts(task: str, instruction: str) -> list[tuple[str, str]]:
    """``[(context, continuation)]`` per option: the model scores ``continuation`` given ``context``.

    Formats follow lm-eval-harness's zero-shot tasks: "Question: <q>\nAnswer:" + " <option>" for BoolQ, PIQA, SIQA
    and ARC; OBQA's question is the first half of a sentence (".. fog around:"), so its option continues the question
    itself, as does HellaSwag's ending its context; for WinoGrande the blank is filled with each option and only the
    shared rest of the sentence is scored ("partial scoring", Trinh & Le 2018), so the options compete on how well
    they explain what follows rather than on their own frequency.
    """
    question, options = commonsense_options(task, instruction)
    if task == "winogrande":
        before, blank, after = question.partition("_")
        if not blank:
            raise ValueError(f"WinoGrande sentence without a `_` blank: {question!r}")
        return [(before + option, " " + after.strip()) for option in options]
    if task == "hellaswag":
        context = _hellaswag_clean(question)
        return [(context, " " + _hellaswag_clean(option)) for option in options]
    if task == "obqa":
        return [(question, " " + option) for option in options]
    return [(f"Question: {question}\nAnswer:", " " + option) for option in options]


# --------------------------------------------------------------------------------------------------------------------
# Dataset loaders (run inside OpenCompass)
# --------------------------------------------------------------------------------------------------------------------

@LOAD_DATASET.register_module()
class FlanTaskDataset(BaseDataset):
    """One task of SMoRA's FLAN-v2 ``combined_test.json`` (columns ``inputs``, ``targets``, ``domain``, ``metric``)."""

    @staticmethod
    def load(path: str, task: str, **kwargs) -> Dataset:
        if not Path(path).is_file():
            raise FileNotFoundError(f"FLAN test data not found: expected {path}. It is {FLAN_SOURCE}.")
        rows = [r for r in json.loads(Path(path).read_text(encoding="utf-8")) if r["task"] == task]
        if not rows:
            raise ValueError(f"`task` {task!r} has no rows in {path}.")
        return Dataset.from_list([{k: r[k] for k in ("inputs", "targets", "domain", "metric")} for r in rows])


@LOAD_DATASET.register_module()
class CommonsenseDataset(BaseDataset):
    """One LLM-Adapters ``test.json`` (``instruction``, ``input``, ``output``, ``answer``).

    With ``task`` (choice mode) each row also gets ``ctx_<label>`` / ``cont_<label>`` for every label of the task,
    from :func:`choice_prompts`; labels beyond the row's own options are empty strings.
    """

    @staticmethod
    def load(path: str, task: Optional[str] = None, **kwargs) -> Dataset:
        if not Path(path).is_file():
            raise FileNotFoundError(f"commonsense test data not found: expected {path}. It is one of "
                                    f"{COMMONSENSE_SOURCE}.")
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
        # `input` is empty in every LLM-Adapters commonsense file; fold it in anyway so nothing is silently dropped.
        records = [dict(instruction=r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else ""),
                        answer=r["answer"])
                   for r in rows]
        if task is not None:
            labels = COMMONSENSE_TASKS[task]["labels"]
            for record, row in zip(records, rows):
                pairs = choice_prompts(task, row["instruction"])
                if record["answer"] not in labels[:len(pairs)]:
                    raise ValueError(f"{path}: answer {record['answer']!r} is not one of the row's option labels "
                                     f"{labels[:len(pairs)]}")
                for i, label in enumerate(labels):
                    record[f"ctx_{label}"], record[f"cont_{label}"] = pairs[i] if i < len(pairs) else ("", "")
        return Dataset.from_list(records)


# --------------------------------------------------------------------------------------------------------------------
# Answer extraction and scoring
# --------------------------------------------------------------------------------------------------------------------

@TEXT_POSTPROCESSORS.register_module("moe_first_label_match")
def first_label_match(text: str, labels: list[str], ignore_case: bool = False) -> str:
    """The first occurrence of any label in ``text`` ('' if none), as the LLM-Adapters evaluation does.

    specs/methods_d2mora_goat_adamole.md §1.7: the first regex match of the label vocabulary, lower-case labels, no
    word boundaries, case-sensitive, no match counts as wrong. ``ignore_case`` is our opt-in for chat models that
    capitalise ("Answer1"); it is off by default so numbers stay comparable with the papers.
    """
    # Longest label first so that e.g. `answer1` never shadows a hypothetical `answer10` at the same position.
    pattern = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    match = re.search(pattern, text, flags=re.IGNORECASE if ignore_case else 0)
    return match.group(0).lower() if match else ""


@TEXT_POSTPROCESSORS.register_module("moe_generation")
def generation_postprocess(text: str) -> str:
    """Strip the answer and cut it where a prompt-format model starts a new block (a blank line or '###')."""
    text = text.strip()
    for stop in ("\n\n", "###"):
        text = text.split(stop, 1)[0]
    return text.strip()


@ICL_EVALUATORS.register_module()
class FlanEMEvaluator(EMEvaluator):
    """OpenCompass's exact match, case-insensitive, with one string target per example.

    EMEvaluator normalises (first line/sentence, no punctuation or articles) but keeps case, so "Yes" vs "yes" would
    be a miss; FLAN targets mix both spellings. It also expects a list of references per example.
    """

    def score(self, predictions, references):
        return super().score([str(p).lower() for p in predictions],
                             [[str(r).lower()] if isinstance(r, str) else [str(x).lower() for x in r]
                              for r in references])


@ICL_INFERENCERS.register_module()
class ChoiceLLInferencer(BaseInferencer):
    """Rank each example's options by the log-likelihood of the option text (choice mode).

    Like OpenCompass's ``PPLInferencer`` it renders one prompt per label of the prompt template, but it scores only
    the continuation (the text of the ``cont_<label>`` column, which every label's prompt ends with) given everything
    before it, instead of the perplexity of the whole prompt. Per example it records two predictions, the two
    lm-eval-harness rules: ``prediction`` = highest log-likelihood per UTF-8 byte of the continuation (acc_norm),
    ``prediction_acc`` = highest summed log-likelihood (acc). A label whose continuation is empty is an option the
    example does not have and is not scored. Needs a model with ``continuation_logprobs`` (:class:`MoeHFBaseModel`).
    """

    def __init__(self, model, max_seq_len: Optional[int] = None, batch_size: Optional[int] = 1,
                 output_json_filepath: Optional[str] = "./icl_inference_output",
                 output_json_filename: Optional[str] = "predictions", **kwargs):
        super().__init__(model=model, max_seq_len=max_seq_len, batch_size=batch_size,
                         output_json_filepath=output_json_filepath, output_json_filename=output_json_filename,
                         **kwargs)

    def inference(self, retriever, ice_template=None, prompt_template=None, output_json_filepath=None,
                  output_json_filename=None) -> list:
        if not hasattr(self.model, "continuation_logprobs"):
            raise TypeError(f"choice mode needs a model with `continuation_logprobs`; {type(self.model).__name__} "
                            f"has none. Use `type={_HERE}.MoeHFBaseModel`.")
        labels = retriever.get_labels(ice_template=ice_template, prompt_template=prompt_template)
        n_examples = len(retriever.retrieve())
        requests = []  # (example index, label, context, continuation)
        for idx in range(n_examples):
            entry = retriever.test_ds[idx]
            for label in labels:
                continuation = entry[f"cont_{label}"]
                if not continuation:
                    continue
                prompt = retriever.generate_label_prompt(idx, "", label, ice_template=ice_template,
                                                         prompt_template=prompt_template)
                text = self.model.parse_template(prompt, mode="ppl")
                if not text.endswith(continuation):
                    raise ValueError(f"the prompt for label {label!r} of example {idx} does not end with its "
                                     f"option text {continuation!r}; the template must end with {{cont_{label}}}.")
                context = text[: len(text) - len(continuation)]
                # Options carry a leading space for "Answer:" + " <option>"; after a prompt wrapper that ends a line
                # ("### Response:\n", the chat template's assistant header) that space would be an artefact.
                if context[-1:].isspace():
                    continuation = continuation.lstrip(" ")
                requests.append((idx, label, context, continuation))

        scores = []
        for start in range(0, len(requests), self.batch_size or 1):
            batch = requests[start: start + (self.batch_size or 1)]
            scores.extend(self.model.continuation_logprobs([r[2] for r in batch], [r[3] for r in batch]))

        results = {str(idx): dict(gold=None) for idx in range(n_examples)}
        best: dict[int, dict] = {}
        for (idx, label, context, continuation), (logprob, n_tokens) in zip(requests, scores):
            n_bytes = len(continuation.encode("utf-8"))
            results[str(idx)][f"label: {label}"] = dict(context=context, continuation=continuation,
                                                        logprob=logprob, tokens=n_tokens, bytes=n_bytes)
            entry = best.setdefault(idx, dict(acc=(label, logprob), acc_norm=(label, logprob / n_bytes)))
            # Strictly greater: ties go to the earlier option, as numpy.argmax in lm-eval-harness.
            if logprob > entry["acc"][1]:
                entry["acc"] = (label, logprob)
            if logprob / n_bytes > entry["acc_norm"][1]:
                entry["acc_norm"] = (label, logprob / n_bytes)
        for idx in range(n_examples):
            if idx not in best:
                raise ValueError(f"example {idx} has no option to score (every cont_<label> column is empty).")
            results[str(idx)]["origin_prompt"] = results[str(idx)][f"label: {best[idx]['acc_norm'][0]}"]["context"]
            results[str(idx)]["prediction"] = best[idx]["acc_norm"][0]
            results[str(idx)]["prediction_acc"] = best[idx]["acc"][0]
        reader = retriever.dataset_reader
        if reader.output_column:
            for idx, gold in enumerate(reader.dataset["test"][reader.output_column]):
                results[str(idx)]["gold"] = gold

        if self.is_main_process:
            out_dir = output_json_filepath or self.output_json_filepath
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, output_json_filename or self.output_json_filename), "w",
                      encoding="utf-8") as handle:
                json.dump(results, handle, indent=4, ensure_ascii=False)
        return [results[str(idx)]["prediction"] for idx in range(n_examples)]


@ICL_EVALUATORS.register_module()
class ChoiceAccEvaluator(BaseEvaluator):
    """Choice-mode accuracy, in %: ``acc_norm`` (byte-length-normalised log-likelihood) and ``acc`` (summed
    log-likelihood), as lm-eval-harness reports them; :data:`CHOICE_HEADLINE` says which one a task's summary row
    shows. OpenCompass passes ``prediction_acc`` from the predictions file because ``score`` names it."""

    def score(self, predictions, references, prediction_acc):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
        details = [dict(pred=p, pred_acc=a, answer=r, correct=p == r)
                   for p, a, r in zip(predictions, prediction_acc, references)]
        n = max(len(references), 1)
        return dict(acc_norm=100 * sum(d["correct"] for d in details) / n,
                    acc=100 * sum(d["pred_acc"] == d["answer"] for d in details) / n,
                    details=details)


# --------------------------------------------------------------------------------------------------------------------
# Model wrappers
# --------------------------------------------------------------------------------------------------------------------

def _cpu_friendly_kwargs(model_kwargs: Optional[dict], tokenizer_path: Optional[str],
                         peft_path: Optional[str]) -> tuple[dict, Optional[str]]:
    model_kwargs = dict(model_kwargs or {})
    # OpenCompass falls back to float16 when no dtype is given, which is slow or unsupported on CPU; routers and
    # adapters are trained in fp32 anyway.
    model_kwargs.setdefault("torch_dtype", "float32")
    if "device_map" not in model_kwargs:
        import torch

        model_kwargs["device_map"] = "auto" if torch.cuda.is_available() else "cpu"
    if peft_path is not None and not (Path(peft_path) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"`peft_path` ({peft_path}) has no adapter_config.json; point it at the output_dir "
                                "of `llamafactory-cli train`.")
    # LLaMA-Factory saves the tokenizer, with the chat template it trained with, next to the adapter.
    if tokenizer_path is None and peft_path is not None and _has_tokenizer(peft_path):
        tokenizer_path = peft_path
    return model_kwargs, tokenizer_path


def _ensure_batch_encode_plus(tokenizer) -> None:
    # transformers 5 removed `batch_encode_plus`, which OpenCompass 0.5.4 still calls (open-compass/opencompass#2573).
    if not hasattr(tokenizer, "batch_encode_plus"):
        object.__setattr__(tokenizer, "batch_encode_plus", tokenizer.__call__)


def chat_meta_template(tokenizer) -> dict:
    """An OpenCompass meta template that reproduces ``tokenizer``'s chat template for one user turn.

    Rendering a sentinel message shows what the template puts before and after the user's text (system prompt,
    turn headers, the assistant header of the generation prompt). A BOS the template writes is dropped when the
    tokenizer adds BOS itself, so the model sees exactly one.
    """
    sentinel = "\x00MOE_SENTINEL\x00"
    text = tokenizer.apply_chat_template([dict(role="user", content=sentinel)], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(sentinel)
    bos = tokenizer.bos_token
    if bos and before.startswith(bos):
        ids = tokenizer("a")["input_ids"]
        if ids and ids[0] == tokenizer.bos_token_id:
            before = before[len(bos):]
    return dict(round=[dict(role="HUMAN", begin=before, end=after),
                       dict(role="BOT", begin="", end="", generate=True)])


@MODELS.register_module()
class MoeHFBaseModel(HuggingFaceBaseModel):
    """OpenCompass's ``HuggingFaceBaseModel`` for base + (MoE-)LoRA adapters, with CPU-safe defaults.

    Differences from the stock class: importing this class registers our PEFT types in the worker; ``torch_dtype``
    defaults to float32 and ``device_map`` to ``cpu`` without a GPU; ``tokenizer_path`` defaults to the adapter
    directory when LLaMA-Factory saved a tokenizer there; ``chat_template=True`` wraps each prompt in the tokenizer's
    chat template (as one user turn), which also works for PPL scoring.
    """

    def __init__(self, path: str, model_kwargs: Optional[dict] = None, tokenizer_path: Optional[str] = None,
                 peft_path: Optional[str] = None, chat_template: bool = False, **kwargs):
        model_kwargs, tokenizer_path = _cpu_friendly_kwargs(model_kwargs, tokenizer_path, peft_path)
        super().__init__(path=path, model_kwargs=model_kwargs, tokenizer_path=tokenizer_path, peft_path=peft_path,
                         **kwargs)
        if chat_template:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(f"`MOE_CHAT_TEMPLATE` is on but the tokenizer at {tokenizer_path or path} has no "
                                 "chat template; unset it or point `tokenizer_path` at a tokenizer that has one.")
            self.template_parser = LMTemplateParser(chat_meta_template(self.tokenizer))

    def _load_tokenizer(self, path, kwargs, pad_token_id=None):
        super()._load_tokenizer(path, kwargs, pad_token_id)
        _ensure_batch_encode_plus(self.tokenizer)

    def continuation_logprobs(self, contexts: list[str], continuations: list[str]) -> list[tuple[float, int]]:
        """``(sum of log p(continuation tokens | context), number of continuation tokens)`` per pair.

        Tokenised as lm-eval-harness does: the continuation's tokens are those of ``context + continuation`` after
        the length of the context's own encoding, so a merge across the boundary is scored the way the model reads
        the joined text. An over-long pair loses tokens from the left; the continuation is always kept whole.
        (OpenCompass's ``get_ppl(mask_length=...)`` cannot be used: it counts the mask from the left edge of a
        left-padded batch.)
        """
        import torch

        rows = []
        for context, continuation in zip(contexts, continuations):
            whole = self.tokenizer(context + continuation, add_special_tokens=True)["input_ids"]
            start = min(len(self.tokenizer(context, add_special_tokens=True)["input_ids"]), len(whole) - 1)
            overflow = len(whole) - self.max_seq_len
            if overflow > 0:
                if overflow >= start:
                    raise ValueError(f"an option of {len(whole) - start} tokens does not fit `max_seq_len` "
                                     f"({self.max_seq_len}); raise MOE_MAX_SEQ_LEN.")
                whole, start = whole[overflow:], start - overflow
            rows.append((whole, max(start, 1)))
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # Right padding keeps every real token at the position it has alone, so the scores do not depend on batching.
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows], device=self.model.device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows],
                            device=self.model.device)
        with torch.no_grad():
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        results = []
        for i, (ids, start) in enumerate(rows):
            # Token t is predicted by the logits at t - 1; only the continuation's rows get a softmax.
            logprobs = torch.log_softmax(logits[i, start - 1: len(ids) - 1].float(), dim=-1)
            targets = input_ids[i, start: len(ids)]
            results.append((float(logprobs.gather(-1, targets[:, None]).sum()), len(ids) - start))
        return results


@MODELS.register_module()
class MoeHFChatModel(HuggingFacewithChatTemplate):
    """OpenCompass's ``HuggingFacewithChatTemplate`` with the same defaults as :class:`MoeHFBaseModel`.

    Generation only (OpenCompass implements PPL scoring on the base class). The prompt is rendered by the
    tokenizer's chat template, which is the one LLaMA-Factory saved next to the adapter.
    """

    def __init__(self, path: str, model_kwargs: Optional[dict] = None, tokenizer_path: Optional[str] = None,
                 peft_path: Optional[str] = None, **kwargs):
        model_kwargs, tokenizer_path = _cpu_friendly_kwargs(model_kwargs, tokenizer_path, peft_path)
        super().__init__(path=path, model_kwargs=model_kwargs, tokenizer_path=tokenizer_path, peft_path=peft_path,
                         **kwargs)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer at {tokenizer_path or path} has no chat template; unset "
                             "`MOE_CHAT_TEMPLATE` or point `tokenizer_path` at a tokenizer that has one.")

    def _load_tokenizer(self, path, kwargs, pad_token_id=None):
        super()._load_tokenizer(path, kwargs, pad_token_id)
        _ensure_batch_encode_plus(self.tokenizer)
