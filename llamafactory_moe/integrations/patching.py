"""The patch engine: applies rows of a patch table (``integrations.llamafactory.PATCHES``) to a module that has just
finished importing.

A leaf: it imports nothing of ours; the integration passes its table in (``apply_patches``, ``check_watched``).

Each row is applied on its own: a row whose target moved upstream (missing attribute, changed signature) is skipped
with one warning, so stock LLaMA-Factory keeps working. Application is idempotent (a replaced attribute carries
``__llamafactory_moe_patch__``). ``LLAMAFACTORY_MOE_BREAK_PATCH=<row name>`` makes that row fail on purpose: a fault
injection switch the test-suite uses to prove the failure path.
"""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Optional

MARKER = "__llamafactory_moe_patch__"

FAILED_PATCHES: dict[str, str] = {}  # row name -> reason, read by the argument layer to refuse MoE methods clearly
APPLIED_PATCHES: list[str] = []


@dataclass(frozen=True)
class Patch:
    name: str
    module: str  # module that defines the target
    target: str  # attribute path inside the module, e.g. "CustomSeq2SeqTrainer.compute_loss"
    make_replacement: Callable  # (original, module) -> replacement
    reason: str
    verified: str  # upstream versions verified
    expected_params: Optional[tuple[str, ...]] = None  # leading parameter names the original must have


def _resolve(module, path: str):
    owner = module
    parts = path.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    return owner, parts[-1]


def _warn(message: str) -> None:
    # The one prefix of llamafactory_moe/errors.py `warn`, written out: this engine imports nothing of ours.
    print(f"llamafactory-moe: warning: {message}", file=sys.stderr)


def apply_patch(row: Patch, module) -> bool:
    try:
        if os.environ.get("LLAMAFACTORY_MOE_BREAK_PATCH", "") == row.name:
            raise RuntimeError("deliberately broken by LLAMAFACTORY_MOE_BREAK_PATCH")
        owner, attr = _resolve(module, row.target)
        original = inspect.getattr_static(owner, attr) if inspect.isclass(owner) else getattr(owner, attr)
        if isinstance(original, (staticmethod, classmethod)):
            raise TypeError("static/class methods are not patchable targets")
        if getattr(original, MARKER, None) == row.name:
            return True
        if inspect.isclass(owner) and attr not in vars(owner):
            original = getattr(owner, attr)  # inherited: wrap the inherited function on this class
        if row.expected_params is not None and callable(original) and not inspect.isclass(original):
            params = tuple(inspect.signature(original).parameters)[: len(row.expected_params)]
            if params != row.expected_params:
                raise TypeError(f"upstream signature changed: expected {row.expected_params}, found {params}")
        replacement = row.make_replacement(original, module)
        try:
            setattr(replacement, MARKER, row.name)
        except (AttributeError, TypeError):
            pass
        setattr(owner, attr, replacement)
    except Exception as exc:  # one clear warning, stock behaviour intact
        FAILED_PATCHES[row.name] = f"{type(exc).__name__}: {exc}"
        _warn(f"patch `{row.name}` ({row.module}.{row.target}) was not applied: {type(exc).__name__}: {exc}. "
              f"Stock LLaMA-Factory behaviour is unchanged; llamafactory-moe methods that need it will refuse to run.")
        return False
    APPLIED_PATCHES.append(row.name)
    return True


def apply_patches(rows: Iterable[Patch], module) -> None:
    """Apply, in table order, every row of ``rows`` that targets ``module`` (which has just finished importing)."""
    for row in rows:
        if row.module == module.__name__:
            apply_patch(row, module)


def unwatched_rows(rows: Iterable[Patch], watched: Collection[str]) -> list[Patch]:
    """The rows whose module is not in ``watched``: nothing would ever hand that module to ``apply_patches``."""
    return [row for row in rows if row.module not in watched]


def check_watched(rows: Iterable[Patch], watched: Collection[str]) -> None:
    """Raise if a row targets a module the startup hook does not watch (such a row would silently never apply)."""
    missing = unwatched_rows(rows, watched)
    if missing:
        raise RuntimeError("patch rows target modules the startup hook does not watch, so they would never apply: "
                           + ", ".join(f"`{row.name}` ({row.module})" for row in missing)
                           + "; add the modules to the watched modules (llamafactory_moe/_autoload.py)")
