"""OpenCompass integration: answer extraction, config parsing, and the real `opencompass` CLI on a tiny model.

The end-to-end tests run `opencompass <config> --debug -w <tmp>` as a subprocess: `--debug` runs every task in one
process and exits non-zero when one fails (without it OpenCompass exits 0 even when every task failed), and the
summary CSV must hold a number for every selected task (specs/opencompass-integration.md §2, §6).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

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
EXPECTED_ROWS = {
    "flan-chat": ["flan-sst2", "flan-common_gen", "flan-wmt16_translate_deen", "flan-avg"],
    "commonsense-gen": ["boolq", "arc-c", "commonsense-avg"],
    "commonsense-ppl-chat": ["piqa-ppl", "obqa-ppl", "commonsense-avg"],
    "commonsense-choice-chat": ["boolq-choice", "piqa-choice", "siqa-choice", "hellaswag-choice",
                                "winogrande-choice", "arc-c-choice", "arc-e-choice", "obqa-choice", "commonsense-avg"],
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
    result = _oc().FlanEMEvaluator().score(["Yes", "it's impossible to say", "no"], ["yes", "It's impossible to say", "yes"])
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
def test_commonsense_config_skips_a_missing_task(tiny_model, monkeypatch, capfd):
    cfg = _parse("commonsense_eval.py", dict(MOE_BASE_MODEL=tiny_model, MOE_NUM_GPUS="0", MOE_EVAL_MODE="ppl",
                                             MOE_EVAL_LIMIT="3"), monkeypatch)
    abbrs = [d["abbr"] for d in cfg.datasets]
    present = [n for n, s in _oc().COMMONSENSE_TASKS.items() if (SHARED_DATA / "commonsense" / s["dir"]).is_dir()]
    assert abbrs == [f"{n}-ppl" for n in present]
    assert all(d["reader_cfg"]["test_range"] == "[0:3]" for d in cfg.datasets)
    if "hellaswag" not in present:
        assert "skipping commonsense task `hellaswag`" in capfd.readouterr().err


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
        from llamafactory_moe.core.peft_types import public_classes  # importing it registers our PEFT types
        from tests.method_cases import METHOD_CASES

        _, method, kwargs, _ = next(row for row in METHOD_CASES if row[0] == kind)
        config_cls = next(cls for name, cls in public_classes().items()
                          if name.lower() == f"{method}config")
        config = config_cls(target_modules=["q_proj", "v_proj"], **kwargs)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("oc_adapters")
    return {kind: _build_adapter(kind, tiny_model, root / kind) for kind in ADAPTER_KINDS}


def run_opencompass(config: str, env: dict, workdir: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in BASE_ENV.items() if not k.startswith("MOE_")}
    # cwd = workdir: OpenCompass writes ./tmp, ./.cache and ./icl_inference_output there.
    return subprocess.run([OPENCOMPASS, str(EVAL_CONFIGS / config), "--debug", "-w", str(workdir / "out")],
                          cwd=workdir, env={**clean, "MOE_NUM_GPUS": "0", **env}, capture_output=True, text=True,
                          timeout=timeout)


def summary_scores(workdir: Path) -> dict[str, str]:
    """{dataset row: the model's cell} from the newest summary CSV."""
    files = sorted((workdir / "out").glob("*/summary/summary_*.csv"))
    assert files, f"no summary CSV under {workdir / 'out'}"
    with files[-1].open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:4] == ["dataset", "version", "metric", "mode"], rows[0]
    return {row[0]: row[4] for row in rows[1:]}


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


@pytest.mark.slow
@needs_shared_data
@pytest.mark.parametrize("kind", ADAPTER_KINDS)
@pytest.mark.parametrize(("scenario", "config", "env"), SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_opencompass_cli_end_to_end(kind, scenario, config, env, tiny_model, adapters, tmp_path):
    result = run_opencompass(config, dict(MOE_BASE_MODEL=tiny_model, MOE_ADAPTER=str(adapters[kind]),
                                          MOE_EVAL_LIMIT="2", MOE_MAX_OUT_LEN="8", MOE_EVAL_BATCH_SIZE="2", **env),
                             tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    scores = summary_scores(tmp_path)
    for row in filter(_task_present, EXPECTED_ROWS[scenario]):
        assert _is_number(scores.get(row, "-")), f"{row}: {scores}"
    if "hellaswag" in env.get("MOE_EVAL_TASKS", "") and not (SHARED_DATA / "commonsense" / "hellaswag").is_dir():
        assert "skipping commonsense task `hellaswag`" in result.stderr
    # The column is named after the adapter directory, so the adapter (not just the base model) was evaluated.
    assert kind in Path(next((tmp_path / "out").glob("*/summary/summary_*.csv"))).read_text().splitlines()[0]


@pytest.mark.slow
@needs_shared_data
def test_opencompass_ppl_on_smollm2(smollm2_model, tmp_path):
    """A real pretrained model, no adapter: PPL commonsense on a few examples gives real accuracies."""
    result = run_opencompass("commonsense_eval.py", dict(MOE_BASE_MODEL=smollm2_model, MOE_EVAL_MODE="ppl",
                                                         MOE_EVAL_TASKS="boolq,piqa", MOE_EVAL_LIMIT="10"),
                             tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    scores = summary_scores(tmp_path)
    for row in ("boolq-ppl", "piqa-ppl", "commonsense-avg"):
        assert _is_number(scores.get(row, "-")) and 0 <= float(scores[row]) <= 100, scores


@pytest.mark.slow
@needs_shared_data
def test_opencompass_choice_on_smollm2_is_above_chance(smollm2_model, tmp_path):
    """A real pretrained model, no adapter: option-text likelihood beats chance where label PPL could not.

    ARC-Easy, first 40 questions, 4 options (chance 25%): SmolLM2-135M-Instruct scored 45% acc_norm and 47.5% acc
    when this test was written (eval_configs/README.md has all tasks on 100 examples, and label PPL at chance on
    BoolQ and PIQA). The 37.5% bar (15 of 40; chance expects 10 and reaches 15 with p = 0.054) leaves a 3-question
    margin for numerical drift.
    """
    result = run_opencompass("commonsense_eval.py", dict(MOE_BASE_MODEL=smollm2_model, MOE_EVAL_MODE="choice",
                                                         MOE_EVAL_TASKS="arc-e", MOE_EVAL_LIMIT="40"),
                             tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    with sorted((tmp_path / "out").glob("*/summary/summary_*.csv"))[-1].open() as handle:
        cells = {(row[0], row[2]): row[4] for row in csv.reader(handle)}
    assert float(cells[("arc-e-choice", "acc_norm")]) >= 37.5, cells
    assert float(cells[("arc-e-choice", "acc")]) >= 37.5, cells


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
    result = run_opencompass("stock_datasets_local.py", dict(MOE_BASE_MODEL=tiny_model, MOE_OC_DATA=str(oc_data),
                                                             MOE_MAX_OUT_LEN="4"), tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    scores = summary_scores(tmp_path)
    assert all(_is_number(scores.get(abbr, "-")) for abbr in ("ARC-c", "ARC-e", "BoolQ")), scores
