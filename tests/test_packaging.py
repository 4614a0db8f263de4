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


def test_wheel_holds_the_startup_line_data_and_project_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "llamafactory_moe_startup.pth" in names  # at the root of site-packages
    assert zipfile.ZipFile(wheel).read("llamafactory_moe_startup.pth").decode() == \
        (REPO / "patches" / "llamafactory_moe_startup.pth").read_text()
    for name in ("data/dataset_info.json", "data/moe_demo.json", "data/moe_demo_eval.json", "methods/smora.py",
                 "core/layer.py"):
        assert f"llamafactory_moe/{name}" in names, name
    # configs/, eval_configs/ and data/ of the checkout, file for file (`llamafactory-moe copy-configs` copies them)
    for folder in ("configs", "eval_configs", "data"):
        shipped = sorted(p.relative_to(REPO).as_posix() for p in (REPO / folder).rglob("*")
                         if p.is_file() and "__pycache__" not in p.parts)
        assert shipped, folder
        for name in shipped:
            assert f"llamafactory_moe/project_files/{name}" in names, name


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


# ---------------------------------------------------------------------------------------------------------------------
# The installed wheel, used as a user uses it: from a folder of their own, through the stock CLIs.
# ---------------------------------------------------------------------------------------------------------------------

STACK_SCRIPTS = ("llamafactory-cli", "opencompass", "torchrun")


@pytest.fixture(scope="module")
def user_venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (not editable). The heavy stack (torch, LLaMA-Factory, OpenCompass ...) is
    reused from this test environment through a .pth line instead of being installed twice; its console scripts are
    written the way pip writes them, for this venv's interpreter. Our package, its startup .pth line and its
    `llamafactory-moe` script come from the wheel alone: a .pth line adds a folder to sys.path without running the
    .pth files in it, so the test environment's editable install and startup hook stay invisible."""
    import importlib.metadata
    import site

    env_dir = tmp_path_factory.mktemp("user") / "venv"
    venv.create(env_dir, with_pip=False, system_site_packages=False)
    python = env_dir / "bin" / "python"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                           "--no-index", str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "zz_reuse_test_stack.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    scripts = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")}
    for name in STACK_SCRIPTS:
        module, attr = scripts[name].value.split(":")
        script = env_dir / "bin" / name
        script.write_text(f"#!{python}\nimport sys\nfrom {module} import {attr.split('.')[0]}\n"
                          f"sys.exit({attr}())\n")
        script.chmod(0o755)
    return env_dir


def _user_env(env_dir: Path) -> dict:
    from tests.conftest import BASE_ENV

    env = {k: v for k, v in BASE_ENV.items() if not k.startswith(("MOE_", "PYTHON"))}
    env.update(VIRTUAL_ENV=str(env_dir), PATH=f"{env_dir / 'bin'}:/usr/local/bin:/usr/bin:/bin")
    return env


@pytest.mark.slow
def test_installed_wheel_trains_evaluates_and_compares_from_a_user_folder(user_venv, tiny_model, tmp_path):
    """The README's commands with the wheel installed in a fresh venv, run from a folder outside the repository:
    copy the configs, `llamafactory-cli train` a SMoRA adapter (3 steps), `opencompass` on it with the shipped eval
    config (no --debug: its worker processes must load the adapter through the wheel's startup hook), and
    `llamafactory-moe compare` on the tiny preset (two of its runs)."""
    import json

    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("the evaluation reads ../shared/data, which is not beside this checkout")
    env = _user_env(user_venv)
    work = tmp_path / "my_project"
    work.mkdir()

    def run(*argv, extra_env=None, timeout=900):
        proc = subprocess.run(list(argv), cwd=work, env={**env, **(extra_env or {})}, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"{argv}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return proc

    where = run("python", "-c", "import llamafactory_moe, llamafactory; print(llamafactory_moe.__file__)")
    assert where.stdout.strip().startswith(str(user_venv)), where.stdout  # the wheel, not the checkout
    assert str(REPO) not in where.stdout

    run("llamafactory-moe", "copy-configs")
    assert (work / "configs" / "llama3_smora.yaml").is_file() and (work / "eval_configs" / "flan_eval.py").is_file()
    assert (work / "data" / "dataset_info.json").is_file()

    run("llamafactory-cli", "train", "configs/demo/smora_cpu.yaml", f"model_name_or_path={tiny_model}",
        "template=llama3", "max_steps=3", "save_steps=3", "logging_steps=1", "cutoff_len=64",
        "per_device_train_batch_size=2", "output_dir=saves/smora", "plot_loss=false")
    adapter = work / "saves" / "smora"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "SMORA"
    logged = [json.loads(line) for line in (adapter / "trainer_log.jsonl").read_text().splitlines()]
    assert [row["current_steps"] for row in logged if "loss" in row] == [1, 2, 3]

    oc_env = dict(MOE_BASE_MODEL=tiny_model, MOE_ADAPTER=str(adapter), MOE_EVAL_DATA=str(SHARED_DATA),
                  MOE_EVAL_MODE="ppl", MOE_EVAL_TASKS="boolq", MOE_EVAL_LIMIT="2", MOE_NUM_GPUS="0")
    run("opencompass", "eval_configs/commonsense_eval.py", "-w", "oc_out", extra_env=oc_env)
    (summary,) = (work / "oc_out").glob("*/summary/summary_*.csv")
    rows = {line.split(",")[0]: line.split(",") for line in summary.read_text().splitlines()}
    assert rows["dataset"][-1] == "smora"                           # the column is the adapter's
    score = rows["boolq-ppl"][-1]
    assert score.replace(".", "", 1).isdigit(), summary.read_text()  # a number, not "-" (a failed worker)

    run("llamafactory-moe", "compare", "configs/compare/tiny.yaml", "--runs", "lora,smora", "--output-dir", "cmp",
        extra_env={"MOE_EVAL_DATA": str(SHARED_DATA)})
    table = json.loads((work / "cmp" / "comparison.json").read_text())
    runs = {row["name"]: row for row in table["runs"]}
    assert set(runs) == {"lora", "smora"}
    assert all(row.get("scores") for row in runs.values()), table
