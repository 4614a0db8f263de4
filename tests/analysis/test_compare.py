"""`llamafactory-moe compare`: preset validation (fast), and the real command end to end on
configs/compare/tiny.yaml (stock `llamafactory-cli train` and `opencompass` subprocesses for every run), its outputs,
resume and failure report."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import BASE_ENV, REPO_ROOT, SHARED_DATA

TINY_PRESET = REPO_ROOT / "configs" / "compare" / "tiny.yaml"
SMOLLM2_PRESET = REPO_ROOT / "configs" / "compare" / "smollm2_commonsense.yaml"
COMPARE = [str(Path(sys.executable).with_name("llamafactory-moe")), "compare"]


def _write(tmp_path: Path, preset: dict) -> Path:
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def _tiny() -> dict:
    return yaml.safe_load(TINY_PRESET.read_text())


# ---------------------------------------------------------------------------------------------------------------------
# Preset validation: no model, no subprocess
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", [TINY_PRESET, SMOLLM2_PRESET], ids=["tiny", "smollm2_commonsense"])
def test_shipped_presets_validate(preset):
    from llamafactory_moe.compare import load_preset
    from llamafactory_moe.core.peft_types import METHODS, register_all_methods

    loaded = load_preset(preset)
    methods = [run.finetuning_type for run in loaded.runs]
    assert "lora" in methods and len(set(methods) - {"lora"}) >= 3
    if preset == SMOLLM2_PRESET:  # the overnight preset compares every implemented method
        register_all_methods()
        assert set(METHODS) <= set(methods)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda p: p["runs"].append({"name": "x", "finetuning_type": "mixlora"}),
     r"`runs\[4\]`: unknown `finetuning_type` 'mixlora'; allowed: \['lora', .*'moelora'"),
    (lambda p: p.pop("template"), r"missing required key `template`"),
    (lambda p: p.pop("eval"), r"missing required key `eval`"),
    (lambda p: p["runs"].append({"name": "x"}), r"`runs\[4\]` is missing `finetuning_type`"),
    (lambda p: p["runs"].append({"finetuning_type": "lora"}), r"`runs\[4\]` is missing `name`"),
    (lambda p: p["runs"].append(dict(p["runs"][0])), r"`name` 'lora' is used twice"),
    (lambda p: p.update(learning_rate=1e-3), r"unknown key\(s\) \['learning_rate'\].*under `train:`"),
    (lambda p: p["train"].update(output_dir="x"), r"`train.output_dir` is set by compare"),
    (lambda p: p["runs"][1].update(template="alpaca"), r"`runs\[1\]`: `template` is set by compare"),
    (lambda p: p["eval"].update(limt=3), r"unknown `eval` key\(s\) \['limt'\]"),
    (lambda p: p["eval"].update(limit=0), r"`eval.limit` must be an integer >= 1"),
    (lambda p: p["eval"].update(config="nope.py"), r"`eval.config` \('nope.py'\) is not a file"),
], ids=["unknown-method", "no-template", "no-eval", "run-no-method", "run-no-name", "duplicate-name",
        "stray-train-key", "reserved-train-key", "reserved-run-key", "eval-typo", "eval-limit", "eval-config"])
def test_preset_errors_name_the_key(mutate, message, tmp_path):
    from llamafactory_moe.compare import PresetError, load_preset

    preset = _tiny()
    mutate(preset)
    with pytest.raises(PresetError, match=message):
        load_preset(_write(tmp_path, preset))


def test_cli_reports_a_bad_preset_without_traceback(tmp_path):
    preset = _tiny()
    preset["runs"][1]["finetuning_type"] = "mixlora"
    proc = subprocess.run([*COMPARE, str(_write(tmp_path, preset)), "--output-dir", str(tmp_path / "out")],
                          env=BASE_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown `finetuning_type` 'mixlora'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_trainable_count_leaves_out_saved_buffers(tmp_path):
    """GOAT saves its frozen initial SVD slices next to the trained weights; only the trained ones count."""
    import torch
    from safetensors.torch import save_file

    from llamafactory_moe.compare import trainable_parameters

    prefix = "base_model.model.model.layers.0.self_attn.q_proj."
    save_file({prefix + "goat_A": torch.zeros(8, 64), prefix + "goat_A_init": torch.zeros(8, 64),
               prefix + "goat_router": torch.zeros(4, 64), prefix + "smora_bias": torch.zeros(8)},
              str(tmp_path / "adapter_model.safetensors"))
    assert trainable_parameters(tmp_path) == {"trainable": 8 * 64 + 4 * 64, "saved_buffers": 8 * 64 + 8}


# ---------------------------------------------------------------------------------------------------------------------
# The real command
# ---------------------------------------------------------------------------------------------------------------------

def _number(cell: str) -> float:
    return float(cell[:-1] if cell.endswith("x") else cell)  # the budget column reads e.g. "1.29x"


def _markdown_rows(text: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return split[0], split[2:]


def recomputed_scores(out: Path, name: str, tasks: list[str], limit: int) -> list[float]:
    """Each task's accuracy recomputed from the run's OpenCompass predictions file (golds checked against the test
    set, each prediction against its recorded perplexities), without OpenCompass's evaluators or summary."""
    from tests.integrations.test_opencompass import accuracy_from_predictions

    scores = []
    for task in tasks:
        (path,) = (out / name / "eval" / "out").glob(f"*/predictions/{name}/{task}.json")
        scores.append(accuracy_from_predictions(path, task.removesuffix("-ppl"), "ppl", n=limit)["accuracy"])
    return scores


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "commonsense").is_dir(),
                    reason=f"commonsense test sets not found at {SHARED_DATA / 'commonsense'}")
def test_compare_tiny_preset_end_to_end_and_resume(tmp_path):
    pytest.importorskip("opencompass", reason="OpenCompass is an optional extra: pip install llamafactory-moe[eval]")
    out = tmp_path / "out"
    argv = [*COMPARE, str(TINY_PRESET), "--output-dir", str(out), "--overlap-eval"]
    proc = subprocess.run(argv, cwd=tmp_path, env=BASE_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    preset = _tiny()
    names = [run["name"] for run in preset["runs"]]
    header, rows = _markdown_rows((out / "comparison.md").read_text())
    assert [row[0] for row in rows] == names
    assert len({row[1] for row in rows} - {"lora"}) >= 3
    tasks = [f"{task}-ppl" for task in preset["eval"]["tasks"]]
    assert header[-len(tasks) - 1:] == [*tasks, "average"]
    for row in rows:  # every cell after run name and method is a number
        for column, cell in zip(header[2:], row[2:]):
            _number(cell)  # raises ValueError with the cell text if it is not a number
        scores = [_number(c) for c in row[-len(tasks) - 1:-1]]
        assert scores == recomputed_scores(out, row[0], tasks, preset["eval"]["limit"]), row
        assert _number(row[-1]) == pytest.approx(sum(scores) / len(scores), abs=0.01)
    assert proc.stdout.count("| lora |") == 1  # the table is printed at the end

    report = json.loads((out / "comparison.json").read_text())
    assert report["header"] == header and report["rows"] == rows
    for run, row in zip(report["runs"], rows):
        assert run["name"] == row[0] and str(run["trainable_params"]) == row[2]
        # Our count (adapter safetensors minus frozen buffers) equals the one LLaMA-Factory printed while training.
        assert run["trainable_params"] == run["llamafactory_trainable_params"] > 0
        assert [run["scores"][t] for t in tasks] == [float(c) for c in row[-len(tasks) - 1:-1]]
        assert (out / run["name"] / "train.yaml").is_file() and (out / run["name"] / "DONE.json").is_file()
        steps = [json.loads(line) for line in Path(run["trainer_log"]).read_text().splitlines() if line.strip()]
        assert sum("loss" in s for s in steps) == preset["train"]["max_steps"]
    goat = next(run for run in report["runs"] if run["finetuning_type"] == "goat")
    assert goat["saved_buffer_params"] > 0  # GOAT's frozen SVD slices are saved but not counted

    from matplotlib.image import imread

    image = imread(out / "curves.png")
    assert image.shape[1] > 1000 and image[..., :3].std() > 0.05  # a real two-panel figure, not a blank canvas

    done_times = {name: (out / name / "DONE.json").stat().st_mtime for name in names}
    start = time.perf_counter()
    again = subprocess.run(argv, cwd=tmp_path, env=BASE_ENV, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped, already done") == len(names) and "training" not in again.stdout
    assert {name: (out / name / "DONE.json").stat().st_mtime for name in names} == done_times
    assert _markdown_rows((out / "comparison.md").read_text()) == (header, rows)
    assert seconds < 60, f"a fully done comparison took {seconds:.0f} s to skip"


@pytest.mark.slow
def test_failing_run_is_reported_and_redone(tmp_path):
    """A run that fails at training is named with its step and log; the others continue; the next call redoes it."""
    preset = _tiny()
    preset["runs"] = [{"name": "broken", "finetuning_type": "moelora", "moe_num_experts": 2, "moe_top_k": 3}]
    path = _write(tmp_path, preset)
    out = tmp_path / "out"
    proc = subprocess.run([*COMPARE, str(path), "--output-dir", str(out)], cwd=tmp_path, env=BASE_ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    log = out / "broken" / "train.log"
    assert "broken (moelora): FAILED at train" in proc.stderr and str(log) in proc.stderr
    assert "moe_top_k" in log.read_text()  # the log holds LLaMA-Factory's own message about the bad key
    _, rows = _markdown_rows((out / "comparison.md").read_text())
    assert rows[0][0] == "broken" and rows[0][2] == f"failed at train: see {log}"
    assert all(cell == "failed at train" for cell in rows[0][3:])
    assert not (out / "broken" / "DONE.json").exists()

    # The next call starts the half-finished run from a clean folder (the stale file goes) instead of skipping it.
    (out / "broken" / "stale.txt").write_text("left over from the failed attempt")
    again = subprocess.run([*COMPARE, str(path), "--output-dir", str(out)], cwd=tmp_path, env=BASE_ENV,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "broken (moelora): training" in again.stdout and "skipped" not in again.stdout
    assert not (out / "broken" / "stale.txt").exists() and (out / "broken" / "train.yaml").is_file()
