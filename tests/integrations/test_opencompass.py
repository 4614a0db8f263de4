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
]
EXPECTED_ROWS = {
    "flan-chat": ["flan-sst2", "flan-common_gen", "flan-wmt16_translate_deen", "flan-avg"],
    "commonsense-gen": ["boolq", "arc-c", "commonsense-avg"],
    "commonsense-ppl-chat": ["piqa-ppl", "obqa-ppl", "commonsense-avg"],
}

needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared eval data not found at {SHARED_DATA}")


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
    for row in EXPECTED_ROWS[scenario]:
        assert _is_number(scores.get(row, "-")), f"{row}: {scores}"
    if "hellaswag" in env.get("MOE_EVAL_TASKS", "") and not (SHARED_DATA / "commonsense" / "hellaswag").is_dir():
        assert "skipping commonsense task `hellaswag`" in result.stderr
    # The column is named after the adapter directory, so the adapter (not just the base model) was evaluated.
    assert kind in Path(next((tmp_path / "out").glob("*/summary/summary_*.csv"))).read_text().splitlines()[0]


SMOLLM2 = Path(os.environ.get("LLAMAFACTORY_MOE_CACHE", Path.home() / ".cache" / "llamafactory_moe")) \
    / "smollm2-135m-instruct"


@pytest.mark.slow
@needs_shared_data
@pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file(),
                    reason="SmolLM2 not prepared; run `python -m llamafactory_moe.models`")
def test_opencompass_ppl_on_smollm2(tmp_path):
    """A real pretrained model, no adapter: PPL commonsense on a few examples gives real accuracies."""
    result = run_opencompass("commonsense_eval.py", dict(MOE_BASE_MODEL=str(SMOLLM2), MOE_EVAL_MODE="ppl",
                                                         MOE_EVAL_TASKS="boolq,piqa", MOE_EVAL_LIMIT="10"),
                             tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    scores = summary_scores(tmp_path)
    for row in ("boolq-ppl", "piqa-ppl", "commonsense-avg"):
        assert _is_number(scores.get(row, "-")) and 0 <= float(scores[row]) <= 100, scores


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
