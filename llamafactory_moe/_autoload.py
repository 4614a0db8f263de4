"""Post-import hooks that apply our patches when peft / LLaMA-Factory / OpenCompass finish importing.

This module runs at interpreter start (through ``llamafactory_moe_startup.pth``) in every Python process of the
environment, including ``llamafactory-cli``, its ``torchrun`` children (which execute ``llamafactory/launcher.py`` as a
script) and OpenCompass worker subprocesses. It therefore imports only the standard library (and our ``errors``, which
does the same) and does nothing until one of the watched modules is imported.

Each watched module maps to a ``"package.module:function"`` that receives the freshly executed module. The function
must never raise (``integrations.patching.apply_patch`` catches and warns per row, ``_run_hook`` below catches the
rest); a failure here must leave the stock library working. Importing ``integrations.llamafactory`` checks that the
modules hooked to it here are exactly the modules its ``PATCHES`` rows target.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import threading

from .errors import warn  # standard library only

# module name -> "module:function" called with the module object once it has finished executing.
WATCHED_MODULES: dict[str, str] = {
    "peft": "llamafactory_moe.core.peft_types:register_all_methods",
    "llamafactory.hparams.parser": "llamafactory_moe.integrations.llamafactory:on_module_imported",
    "llamafactory.model.loader": "llamafactory_moe.integrations.llamafactory:on_module_imported",
    "llamafactory.train.tuner": "llamafactory_moe.integrations.llamafactory:on_module_imported",
    "llamafactory.train.callbacks": "llamafactory_moe.integrations.llamafactory:on_module_imported",
    "llamafactory.extras.ploting": "llamafactory_moe.integrations.llamafactory:on_module_imported",
    "llamafactory.train.sft.trainer": "llamafactory_moe.integrations.llamafactory:on_module_imported",
    "llamafactory.train.pt.trainer": "llamafactory_moe.integrations.llamafactory:on_module_imported",
    "llamafactory.train.dpo.trainer": "llamafactory_moe.integrations.llamafactory:on_module_imported",
    "llamafactory.train.kto.trainer": "llamafactory_moe.integrations.llamafactory:on_module_imported",
    "llamafactory.train.rm.trainer": "llamafactory_moe.integrations.llamafactory:on_module_imported",
    **{f"llamafactory.webui.{m}": "llamafactory_moe.integrations.llamafactory:on_module_imported"  # LlamaBoard rows
       for m in ("common", "control", "runner", "chatter", "components.top", "components.train", "components.export")},
}

_lock = threading.RLock()
_done: set[str] = set()


def _run_hook(module) -> None:
    name = module.__name__
    with _lock:
        if name in _done:
            return
        _done.add(name)
    target = WATCHED_MODULES[name]
    module_name, func_name = target.split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        func(module)
    except Exception as exc:  # never break the user's import
        _warn_once(f"could not run the import hook for `{name}` ({type(exc).__name__}: {exc}); "
                   "stock behaviour is unchanged.")


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warn(message)


class _HookedLoader(importlib.abc.Loader):
    """Delegates to the real loader, then runs our hook on the executed module."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _run_hook(module)

    def __getattr__(self, item):  # get_resource_reader, is_package, get_code ... keep working
        return getattr(self._loader, item)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in WATCHED_MODULES or fullname in _done:
            return None
        # Ask the remaining finders for the real spec (skipping ourselves).
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _HookedLoader):
                    spec.loader = _HookedLoader(spec.loader)
                return spec
        return None


_finder = _PostImportFinder()


def install() -> None:
    """Install the finder (idempotent) and patch watched modules that are already imported."""
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _finder)
    for name in list(WATCHED_MODULES):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__spec__", None) is not None:
            # Only a module that finished executing is safe to patch; a partially imported one is still running
            # its body and will be handled by the loader wrapper.
            if not getattr(module.__spec__, "_initializing", False):
                _run_hook(module)
