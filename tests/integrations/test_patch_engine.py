"""The patch engine is a leaf and every patch row reaches its module.

* ``integrations/patching.py`` imports nothing of ours (statically, and at run time in a fresh interpreter).
* The startup hook's watched modules are exactly the modules the ``PATCHES`` rows target; a made-up row for an
  unwatched module is caught, and importing the integration fails when a row's module is not watched.
* No import cycle among ``llamafactory_moe.integrations`` modules (function-local imports included).
* Installing the process hooks (excepthook, log handler) is a step of its own, not part of applying patches.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest

import llamafactory_moe
from llamafactory_moe import _autoload
from llamafactory_moe.integrations import patching
from llamafactory_moe.integrations.patching import Patch, apply_patches, check_watched, unwatched_rows

PACKAGE_DIR = Path(llamafactory_moe.__file__).resolve().parent
INTEGRATIONS_DIR = PACKAGE_DIR / "integrations"
INTEGRATION = "llamafactory_moe.integrations.llamafactory"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    """Absolute names of everything ``path`` imports, at module level or inside functions. ``from pkg import name``
    yields ``pkg.name`` when that is a module of ours, else ``pkg``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                rel = candidate.split(".")[1:]
                if candidate.startswith("llamafactory_moe.") and (
                        PACKAGE_DIR.joinpath(*rel).with_suffix(".py").is_file() or PACKAGE_DIR.joinpath(*rel).is_dir()):
                    found.append(candidate)
                else:
                    found.append(module)
    return found


def test_patching_imports_nothing_of_ours():
    path = INTEGRATIONS_DIR / "patching.py"
    ours = [m for m in _imports(path) if m == "llamafactory_moe" or m.startswith("llamafactory_moe.")]
    relative = [node for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ImportFrom) and node.level]
    assert not ours and not relative, (ours, relative)
    # and at run time: only the package inits on the way are loaded (the startup .pth loads _autoload, which loads the
    # standard-library-only `errors` for its warning printer), nothing heavy
    script = ("import sys, llamafactory_moe.integrations.patching\n"
              "print(sorted(m for m in sys.modules if m.startswith('llamafactory_moe')))\n"
              "print(sorted(m for m in ('torch', 'transformers', 'peft', 'llamafactory') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    loaded, heavy = proc.stdout.splitlines()
    assert eval(loaded) == ["llamafactory_moe", "llamafactory_moe._autoload", "llamafactory_moe.errors",
                            "llamafactory_moe.integrations", "llamafactory_moe.integrations.patching"], loaded
    assert eval(heavy) == [], heavy


def test_patching_does_not_install_process_hooks():
    source = (INTEGRATIONS_DIR / "patching.py").read_text()
    assert "excepthook" not in source and "install_process_hooks" not in source and "logging" not in source


def test_watched_modules_are_exactly_the_patched_modules():
    lf = importlib.import_module(INTEGRATION)
    assert {row.module for row in lf.PATCHES} == lf.watched_modules()
    assert unwatched_rows(lf.PATCHES, lf.watched_modules()) == []
    check_watched(lf.PATCHES, lf.watched_modules())
    # every hook target the startup hook names resolves to the integration's entry point
    for target in {t for t in _autoload.WATCHED_MODULES.values() if t.startswith("llamafactory_moe.integrations.")}:
        module_name, func_name = target.split(":")
        assert getattr(importlib.import_module(module_name), func_name) is lf.on_module_imported, target
    # each row lives in the module of the package that mirrors its target (one file per patched upstream module)
    homes = {}
    for row in lf.PATCHES:
        homes.setdefault(row.module, set()).add(row.make_replacement.__module__)
    assert all(len(files) == 1 for files in homes.values()), homes


def test_a_row_for_an_unwatched_module_is_caught():
    lf = importlib.import_module(INTEGRATION)
    made_up = Patch("made_up_row", "llamafactory.not_watched", "anything", lambda original, module: original,
                    "test", "none")
    assert unwatched_rows(lf.PATCHES + [made_up], lf.watched_modules()) == [made_up]
    with pytest.raises(RuntimeError, match=r"`made_up_row` \(llamafactory.not_watched\)"):
        check_watched(lf.PATCHES + [made_up], lf.watched_modules())


def test_importing_the_integration_fails_when_a_patched_module_is_not_watched():
    # Drop one watched module before the integration is imported: its rows are now unwatched, and the import says so.
    script = ("from llamafactory_moe import _autoload\n"
              "del _autoload.WATCHED_MODULES['llamafactory.extras.ploting']\n"
              f"import {INTEGRATION}\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode != 0
    assert "RuntimeError" in proc.stderr and "`plot_loss` (llamafactory.extras.ploting)" in proc.stderr, proc.stderr


def _our_import_graph() -> dict[str, set[str]]:
    """Every module of the package (the shipped project files are data) -> the modules of ours it imports, at module
    level or inside functions."""
    files = [p for p in sorted(PACKAGE_DIR.rglob("*.py")) if "project_files" not in p.relative_to(PACKAGE_DIR).parts]
    nodes = {_module_name(p): p for p in files}
    return {name: {m for m in _imports(path) if m in nodes and m != name} for name, path in nodes.items()}


def test_no_import_cycle_among_our_modules():
    graph = _our_import_graph()
    assert f"{INTEGRATION}.trainer" in graph and f"{INTEGRATION}.hparams" in graph
    assert "llamafactory_moe.core.layer" in graph and "llamafactory_moe.methods.smora" in graph
    assert "llamafactory_moe.core.loss_window" in graph["llamafactory_moe.core.layer"]  # edges are really read
    # a submodule importing its own package's __init__ (which imports every submodule) would be a cycle
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert graph["llamafactory_moe.integrations.patching"] == set()


def test_the_package_imports_in_a_fresh_interpreter_and_re_exports_what_others_import():
    names = ["PATCHES", "on_module_imported", "watched_modules", "our_method_of", "peft_type_of",
             "_setup_moe_adapter", "_MoeLogAccumulator", "_wrap_compute_loss", "_wrap_log", "install_process_hooks",
             "MoeStepCallback", "saved_adapter_shapes", "check_adapter_fits"]
    script = f"from {INTEGRATION} import {', '.join(names)}\nprint(len(PATCHES))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) == 23 + 9  # + the LlamaBoard rows (integrations/llamaboard.py)


def test_applying_patches_is_separate_from_installing_process_hooks(monkeypatch):
    lf = importlib.import_module(INTEGRATION)
    from llamafactory_moe.integrations.llamafactory import process_hooks

    monkeypatch.setattr(patching, "APPLIED_PATCHES", [])
    monkeypatch.setattr(patching, "FAILED_PATCHES", {})
    shared = []
    monkeypatch.setattr(process_hooks, "_share_llamafactory_log_handler", lambda: shared.append(True))

    def stock_hook(*exc_info):
        pass

    monkeypatch.setattr(sys, "excepthook", stock_hook)
    fake = types.ModuleType("fake.upstream")
    fake.f = lambda: "stock"
    rows = [Patch("fake_f", "fake.upstream", "f", lambda original, module: lambda: "patched", "test", "none"),
            Patch("other_module", "fake.other", "f", lambda original, module: None, "test", "none")]
    apply_patches(rows, fake)
    assert fake.f() == "patched" and patching.APPLIED_PATCHES == ["fake_f"] and patching.FAILED_PATCHES == {}
    assert sys.excepthook is stock_hook and not shared  # applying patches installs no process hooks

    lf.on_module_imported(types.ModuleType("fake.nothing_targets_this"))
    assert getattr(sys.excepthook, "_llamafactory_moe", False) and shared == [True]
    assert patching.APPLIED_PATCHES == ["fake_f"]
