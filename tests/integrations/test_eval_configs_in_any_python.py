"""The eval configs parse in every interpreter a user has, not only this machine's base Python.

mmengine decides whether an imported module is "built in" by comparing its file with the running interpreter's prefix
(`mmengine.config.utils.PYTHON_ROOT_DIR`, from `sys.executable`). In a venv made from pyenv, uv, conda or a
python.org build, the standard library lives elsewhere, so `from importlib import import_module` became a lazy
placeholder that raised a bare RuntimeError when the config called it. Here that prefix is pointed at an empty folder
(what every such venv looks like to mmengine), and each config must still parse; the old import form must not (the
negative control shows the simulation reproduces the bug).
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import REPO_ROOT, SHARED_DATA

EVAL_CONFIGS = REPO_ROOT / "eval_configs"


@pytest.fixture()
def foreign_python(monkeypatch, tmp_path, tiny_model, oc_data_root):
    """mmengine sees an interpreter whose prefix holds none of the standard library; MOE_* set for a parse."""
    from mmengine.config import utils

    monkeypatch.setattr(utils, "PYTHON_ROOT_DIR", str(tmp_path / "some-venv"))
    for key in [k for k in os.environ if k.startswith("MOE_")]:
        monkeypatch.delenv(key)
    env = dict(MOE_BASE_MODEL=tiny_model, MOE_NUM_GPUS="0", MOE_OC_DATA=str(oc_data_root), MOE_EVAL_LIMIT="1")
    if SHARED_DATA.is_dir():
        env["MOE_EVAL_DATA"] = str(SHARED_DATA)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return utils


@pytest.fixture()
def oc_data_root(tmp_path):
    """Empty files where stock_datasets_local.py checks for them (only their presence is read while parsing)."""
    root = tmp_path / "OpenCompassData"
    for rel in ("data/ARC/ARC-c/ARC-Challenge-Dev.jsonl", "data/ARC/ARC-e/ARC-Easy-Dev.jsonl",
                "data/SuperGLUE/BoolQ/val.jsonl"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("")
    return root


def test_the_simulation_makes_stdlib_modules_foreign(foreign_python):
    assert not foreign_python._is_builtin_module("importlib")
    assert not foreign_python._is_builtin_module("json")


@pytest.mark.parametrize("name", sorted(p.name for p in EVAL_CONFIGS.glob("*.py")))
def test_eval_config_parses_in_a_venv_of_another_python(name, foreign_python):
    from mmengine.config import Config

    if name != "stock_datasets_local.py" and not SHARED_DATA.is_dir():
        pytest.skip("the commonsense / FLAN configs read ../shared/data while parsing; it is not beside this checkout")
    cfg = Config.fromfile(str(EVAL_CONFIGS / name), format_python_code=False)
    assert cfg.models and cfg.datasets


def test_negative_control_the_old_import_breaks(foreign_python, tmp_path):
    """The config as it was: `from importlib import import_module` fails in the simulated venv, as users saw."""
    from mmengine.config import Config

    old = tmp_path / "old_flan_eval.py"
    text = (EVAL_CONFIGS / "flan_eval.py").read_text()
    old_call = "_oc = __import__('llamafactory_moe.integrations.opencompass', fromlist=['model_config'])"
    assert old_call in text
    old.write_text(text.replace(old_call, "from importlib import import_module\n"
                                          "_oc = import_module('llamafactory_moe.integrations.opencompass')"))
    with pytest.raises(RuntimeError):
        Config.fromfile(str(old), format_python_code=False)
