"""The project's own demo data (``moe_demo``, ``moe_demo_eval``), shipped inside the wheel, and its answer checker.

Use the directory from :func:`demo_data_dir` as LLaMA-Factory's ``dataset_dir``::

    dataset_dir: <demo_data_dir()>
    dataset: moe_demo

The files are written by ``make_demo_data.py`` in this directory (see its docstring for the tasks). Standard library
only: this package is imported by tests and benchmarks before torch is.
"""

from __future__ import annotations

import re
from pathlib import Path

from .make_demo_data import TASKS as DEMO_TASKS

__all__ = ["DEMO_TASKS", "demo_data_dir", "score_demo_answer"]

_INT = re.compile(r"-?\d+")
# Wrapping a model may put around an otherwise correct answer.
_STRIP = " \t\"'`.。"


def demo_data_dir() -> Path:
    """The installed directory holding ``dataset_info.json``, ``moe_demo.json`` and ``moe_demo_eval.json``."""
    return Path(__file__).resolve().parent


def _first_line(text: str) -> str:
    # Generations often run on after the answer (a new line, another turn); only the first non-empty line counts.
    for line in text.strip().splitlines():
        if line.strip():
            return " ".join(line.split()).strip(_STRIP)
    return ""


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def score_demo_answer(task: str, prediction: str, target: str) -> bool:
    """Whether ``prediction`` (a model generation) correctly answers a ``moe_demo`` example with output ``target``.

    Rules per task, applied to the first non-empty line of the prediction:

    * ``add``, ``larger``: its first integer equals the target ("52 is larger" passes, "46 or 52" does not);
    * ``uppercase``: equal to the target after collapsing whitespace, case-sensitive (the case is the task);
    * ``reverse_word``: equal ignoring case and surrounding quotes / full stop;
    * ``sort_letters``: the same letters in the same order, any separators ("a, b, c" and "abc" pass);
    * ``digits_to_words``: the same sequence of digit words, ignoring case and punctuation.
    """
    line = _first_line(prediction)
    if task in ("add", "larger"):
        found = _INT.search(line)
        return found is not None and int(found.group()) == int(target)
    if task == "uppercase":
        return line == " ".join(target.split())
    if task == "reverse_word":
        return line.lower() == target.strip().lower()
    if task == "sort_letters":
        return "".join(_words(line)) == "".join(_words(target))
    if task == "digits_to_words":
        return _words(line) == _words(target)
    raise ValueError(f"unknown moe_demo task {task!r}; expected one of {', '.join(DEMO_TASKS)}")
