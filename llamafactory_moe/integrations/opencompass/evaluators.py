"""Answer extraction and scoring: text postprocessors and evaluators.

Mirrors ``opencompass.utils.text_postprocessors`` (``TEXT_POSTPROCESSORS``) and ``opencompass.openicl.icl_evaluator``
(``ICL_EVALUATORS``: ``EMEvaluator``, ``AccEvaluator``).
"""

from __future__ import annotations

import re

from opencompass.openicl.icl_evaluator import BaseEvaluator, EMEvaluator
from opencompass.registry import ICL_EVALUATORS, TEXT_POSTPROCESSORS

# --------------------------------------------------------------------------------------------------------------------
# Answer extraction and scoring
# --------------------------------------------------------------------------------------------------------------------

@TEXT_POSTPROCESSORS.register_module("moe_first_label_match")
def first_label_match(text: str, labels: list[str], ignore_case: bool = False) -> str:
    """The first occurrence of any label in ``text`` ('' if none), as the LLM-Adapters evaluation does.

    The first regex match of the label vocabulary, lower-case labels, no
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
