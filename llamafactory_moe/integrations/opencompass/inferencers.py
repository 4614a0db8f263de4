"""Choice-mode inference: rank options by the log-likelihood of their text.

Mirrors ``opencompass.openicl.icl_inferencer`` (``ICL_INFERENCERS``), next to its ``icl_ppl_inferencer`` and
``icl_ll_inferencer``; the per-continuation scores come from :meth:`MoeHFBaseModel.continuation_logprobs`
(``models.py``).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from opencompass.openicl.icl_inferencer.icl_base_inferencer import BaseInferencer
from opencompass.registry import ICL_INFERENCERS

from .settings import _HERE

# --------------------------------------------------------------------------------------------------------------------
# Choice mode: options scored by the likelihood of their text
# --------------------------------------------------------------------------------------------------------------------

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
