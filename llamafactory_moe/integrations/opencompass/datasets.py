"""Dataset loaders (run inside OpenCompass), the FLAN task list, and the option parsing of choice mode.

Mirrors ``opencompass.datasets``: loaders registered in ``LOAD_DATASET`` (like ``opencompass.datasets.piqa``), each
with the dataset-specific parsing next to it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from datasets import Dataset
from opencompass.datasets.base import BaseDataset
from opencompass.registry import LOAD_DATASET

from .settings import CHOICE_OPTION_WORDS, COMMONSENSE_SOURCE, COMMONSENSE_TASKS, FLAN_FILE, FLAN_SOURCE

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
