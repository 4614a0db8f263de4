"""One registry (issue 13): a new method is one file in ``llamafactory_moe/methods/`` (and its test).

* Every registered method carries examples (the test matrix and the CLI tests run every method through them).
* Method files are discovered: a real import error inside one surfaces, a file that registers nothing is an error.
* Drop-in proof: a copy of the installed package gets ``methods/dropmoe.py``, made from ``methods/moelora.py`` by a
  mechanical rename (no other file edited). With the copy first on ``PYTHONPATH``, ``llamafactory-moe keys`` lists it,
  ``llamafactory-cli train`` rejects an invalid value of one of its keys with our one-line message and trains it (tiny
  model, 2 steps) into an adapter whose ``peft_type`` is ``DROPMOE``, and ``tests/method_cases.py`` builds its cases.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import llamafactory_moe
from llamafactory_moe.core import Example
from llamafactory_moe.core.peft_types import METHODS, register_all_methods
from tests.conftest import BASE_ENV, REPO_ROOT, run_cli, train_args
from tests.method_cases import METHOD_CASES, build_cases

NEW, NEW_CLS = "dropmoe", "DropMoE"  # the new method, renamed from moelora / MoELoRA
PACKAGE_DIR = Path(llamafactory_moe.__file__).resolve().parent


def test_every_registered_method_has_valid_examples_and_is_in_the_cases():
    register_all_methods()
    missing = [name for name, spec in METHODS.items() if not spec.config_cls.examples]
    assert not missing, f"registered methods without an example: {missing}; give their config class " \
                        "`examples = (Example(...),)`"
    for name, spec in METHODS.items():
        for example in spec.config_cls.examples:
            assert isinstance(example, Example), (name, example)
            assert example.id == name or example.id.startswith(f"{name}-"), (name, example.id)
            config = spec.config_cls(target_modules=["q_proj"], **example.kwargs)  # a valid configuration
            assert config.method_name == name
    assert [case[0] for case in METHOD_CASES] == [e.id for s in METHODS.values() for e in s.config_cls.examples]
    assert {case[1] for case in METHOD_CASES} == set(METHODS)
    assert build_cases() == METHOD_CASES


def test_hand_written_expectations_cover_every_method():
    """The tables that state what a method must do by hand (independent of the code under test) name every method:
    a new method fails here rather than silently skipping the accumulation test or failing inside the stage runs."""
    from tests.integrations.test_stages import AUX_TERMS, UNROUTED
    from tests.test_accumulation import ROUTED

    register_all_methods()
    assert set(AUX_TERMS) == {case[0] for case in METHOD_CASES}, "add each example id to AUX_TERMS in test_stages.py"
    routed = {name for name, spec in METHODS.items() if spec.config_cls.has_router}
    assert set(ROUTED) == routed, "add the method's routed example to ROUTED in test_accumulation.py"
    assert UNROUTED == set(METHODS) - routed, "UNROUTED in test_stages.py: the methods whose `has_router` is False"


def test_every_registered_method_has_its_reference_test():
    """Each method is checked against a straightforward loop reference written in its own test file; a new method
    fails here until `tests/methods/test_<name>.py` exists and compares it with one."""
    register_all_methods()
    methods_dir = REPO_ROOT / "tests" / "methods"
    missing = [name for name in METHODS if not (methods_dir / f"test_{name}.py").is_file()]
    assert not missing, f"no reference test for {missing}: write tests/methods/test_<name>.py"
    for name in METHODS:
        text = (methods_dir / f"test_{name}.py").read_text()
        assert "reference" in text.lower(), f"tests/methods/test_{name}.py compares with no reference"


def _copy_package(root: Path) -> Path:
    """The installed package tree copied under ``root`` (to put first on ``PYTHONPATH``); returns its methods dir."""
    shutil.copytree(PACKAGE_DIR, root / "llamafactory_moe", ignore=shutil.ignore_patterns("__pycache__"))
    return root / "llamafactory_moe" / "methods"


def _env(root: Path, *extra: Path) -> dict:
    return {**BASE_ENV, "PYTHONPATH": os.pathsep.join(map(str, (root, *extra)))}


@pytest.mark.parametrize("source, words", [
    ("import llamafactory_moe_no_such_module\n", "No module named 'llamafactory_moe_no_such_module'"),
    ("VALUE = 1\n", "registers no method; end the file with `register_method(<Config>, <Model>)`"),
], ids=["import-error-surfaces", "file-without-register-method"])
def test_discovery_does_not_swallow_a_broken_method_file(source, words, tmp_path):
    methods_dir = _copy_package(tmp_path)
    (methods_dir / "broken.py").write_text(source)
    script = "import llamafactory_moe.methods"
    proc = subprocess.run([sys.executable, "-c", script], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert words in proc.stderr.strip().splitlines()[-1], proc.stderr[-3000:]


@pytest.fixture(scope="module")
def drop_in(tmp_path_factory) -> Path:
    """A package copy with ``methods/dropmoe.py``: ``methods/moelora.py`` with its names substituted, nothing else."""
    root = tmp_path_factory.mktemp("drop_in")
    methods_dir = _copy_package(root)
    source = (methods_dir / "moelora.py").read_text()
    assert NEW not in source and NEW_CLS not in source
    renamed = source.replace("moelora", NEW).replace("MoELoRA", NEW_CLS)
    assert f'method_name: ClassVar[str] = "{NEW}"' in renamed and f'prefix = "{NEW}_"' in renamed
    (methods_dir / f"{NEW}.py").write_text(renamed)
    return root


def test_drop_in_is_registered_and_the_case_builder_picks_it_up(drop_in):
    script = (
        "import json, llamafactory_moe\n"
        "from llamafactory_moe.core.peft_types import METHODS, register_all_methods\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING\n"
        "from tests.method_cases import METHOD_CASES\n"
        "register_all_methods()\n"
        f"spec = METHODS[{NEW!r}]\n"
        "print(json.dumps({'file': llamafactory_moe.__file__, 'methods': list(METHODS),\n"
        "                  'peft': sorted(k.value for k in PEFT_TYPE_TO_CONFIG_MAPPING),\n"
        "                  'classes': [spec.config_cls.__name__, spec.model_cls.__name__, spec.model_cls.prefix],\n"
        f"                  'cases': [c[:2] for c in METHOD_CASES if c[1] == {NEW!r}]}}))\n"
    )
    # The copy first, the checkout after it (for `tests.method_cases`); the venv's start-up hook imports the package
    # at interpreter start, so the assertion on `__file__` shows which copy every import below used.
    proc = subprocess.run([sys.executable, "-c", script], env=_env(drop_in, REPO_ROOT), capture_output=True,
                          text=True, timeout=300, cwd=drop_in)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).resolve() == (drop_in / "llamafactory_moe" / "__init__.py").resolve(), out["file"]
    assert set(out["methods"]) == set(METHODS) | {NEW}
    assert NEW.upper() in out["peft"]
    assert out["classes"] == [f"{NEW_CLS}Config", f"{NEW_CLS}Model", f"{NEW}_"]
    assert out["cases"] == [[f"{NEW}-top2", NEW], [f"{NEW}-soft", NEW]]


def test_drop_in_is_listed_by_keys(drop_in):
    proc = subprocess.run(["llamafactory-moe", "keys"], env=_env(drop_in), capture_output=True, text=True,
                          timeout=300, cwd=drop_in)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| `finetuning_type`")]
    assert len(rows) == 1 and f"`{NEW}`" in rows[0], proc.stdout[:2000]
    assert any(line.startswith("| `moe_num_experts` |") and NEW in line for line in proc.stdout.splitlines())


@pytest.mark.slow
def test_drop_in_invalid_value_is_rejected_with_one_line(drop_in, tmp_path):
    config = dict(model_name_or_path="/nonexistent/model-that-must-not-be-loaded", stage="sft", do_train=True,
                  finetuning_type=NEW, moe_num_experts=2, moe_top_k=5, lora_rank=4, dataset="tiny",
                  template="llama3", output_dir=str(tmp_path / "out"), report_to="none")
    proc = run_cli(["llamafactory-cli", "train"], config, tmp_path, env=_env(drop_in), timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if "llamafactory-moe: invalid configuration:" in x)
    assert f"`moe_top_k` (5) must be <= `moe_num_experts` (2) for `{NEW}`" in line, proc.stderr[-3000:]


@pytest.mark.slow
def test_drop_in_trains_with_stock_llamafactory_cli(drop_in, tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(["llamafactory-cli", "train"],
                   train_args(tiny_model, tiny_data, str(out), finetuning_type=NEW, max_steps=2), tmp_path,
                   env=_env(drop_in), timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == NEW.upper()
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(f".{NEW}_" in k for k in keys), keys[:5]
    steps = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    assert [s["current_steps"] for s in steps if "loss" in s] == [1, 2], steps
