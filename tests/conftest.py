"""Shared fixtures: a tiny offline Llama (cached), a tiny alpaca dataset, and a helper to run the real CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Subprocess environment: offline, quiet, deterministic thread count on a 2-core machine.
BASE_ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "DISABLE_VERSION_CHECK": "1",
    "LLAMAFACTORY_VERBOSITY": "WARN",
}


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from llamafactory_moe.testing import tiny_llama_path

    return str(tiny_llama_path())


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """64 short alpaca records (digit addition) registered as `tiny` in a dataset_info.json."""
    import random

    rng = random.Random(0)
    root = tmp_path_factory.mktemp("tiny_data")
    rows = []
    for _ in range(64):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"instruction": f"add {a} and {b}", "input": "", "output": str(a + b)})
    (root / "tiny.json").write_text(json.dumps(rows))
    (root / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    return str(root)


def train_args(model: str, data: str, output_dir: str, **overrides) -> dict:
    """LLaMA-Factory `TRAIN_ARGS` for a few CPU steps on the tiny model (LLaMA-Factory's own test style)."""
    args = dict(
        model_name_or_path=model, stage="sft", do_train=True, finetuning_type="moelora", lora_target="all",
        lora_rank=4, moe_num_experts=4, moe_top_k=2, dataset="tiny", dataset_dir=data, template="llama3",
        cutoff_len=64, max_samples=32, output_dir=output_dir, overwrite_output_dir=True,
        per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=4, logging_steps=1,
        save_steps=1000, learning_rate=1e-3, report_to="none", bf16=False, seed=0, data_seed=0,
        preprocessing_num_workers=1, dataloader_num_workers=0, disable_tqdm=True,
    )
    args.update(overrides)
    return {k: v for k, v in args.items() if v is not None}


def run_cli(command: list[str], config: dict | None, workdir: Path, env: dict | None = None,
            timeout: int = 600, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Write `config` as yaml and run e.g. `llamafactory-cli train <yaml>` as a real subprocess."""
    argv = list(command)
    if config is not None:
        path = Path(workdir) / f"cfg_{abs(hash(json.dumps(config, sort_keys=True, default=str)))}.yaml"
        path.write_text(yaml.safe_dump(config))
        argv.append(str(path))
    return subprocess.run(argv, cwd=workdir, env={**BASE_ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, input=stdin)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def final_train_loss(output_dir) -> float:
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e][-1]
