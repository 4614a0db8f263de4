"""`pip install .` (a real wheel, not the editable install the suite runs from) ships the startup hook and the data.

The wheel goes into a fresh virtual environment without the system site-packages: the hook is standard-library only,
so a plain interpreter start there must import llamafactory_moe from the wheel's own `.pth` line, with no torch.
"""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                           "-w", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("llamafactory_moe-*.whl")
    return path


def test_wheel_holds_the_startup_line_data_and_demo_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "llamafactory_moe_startup.pth" in names  # at the root of site-packages
    assert zipfile.ZipFile(wheel).read("llamafactory_moe_startup.pth").decode() == \
        (REPO / "patches" / "llamafactory_moe_startup.pth").read_text()
    for name in ("data/dataset_info.json", "data/moe_demo.json", "data/moe_demo_eval.json",
                 "demo_configs/moelora_cpu.yaml", "methods/smora.py", "core/layer.py"):
        assert f"llamafactory_moe/{name}" in names, name


def test_wheel_install_runs_the_hook_at_interpreter_start(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, system_site_packages=False)
    python = env_dir / "bin" / "python"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                           "--no-index", str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    check = ("import sys; m = sys.modules.get('llamafactory_moe'); "
             "print(m.__file__ if m else None, 'torch' in sys.modules, "
             "any(type(f).__name__ == '_PostImportFinder' for f in sys.meta_path))")
    started = subprocess.run([str(python), "-c", check], capture_output=True, text=True, timeout=120, cwd="/")
    assert started.returncode == 0 and not started.stderr, started.stderr
    file, torch_loaded, finder = started.stdout.split()
    assert file.startswith(str(env_dir)), file          # imported by the wheel's .pth, from the venv
    assert torch_loaded == "False" and finder == "True"  # nothing heavy at start-up, hook installed
    disabled = subprocess.run([str(python), "-c", check], capture_output=True, text=True, timeout=120, cwd="/",
                              env={"LLAMAFACTORY_MOE_DISABLE": "1", "PATH": "/usr/bin:/bin"})
    assert disabled.stdout.split()[0] == "None", disabled.stdout
