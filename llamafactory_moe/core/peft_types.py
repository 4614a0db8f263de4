"""The only code that extends peft's ``PeftType`` enum and calls ``register_peft_method``.

peft 0.18 only registers methods whose upper-cased name is already a ``PeftType`` member (``register_peft_method``
checks ``name.upper() in list(PeftType)``), and saving checks ``config.peft_type in list(PeftType)``. ``PeftType`` is a
closed ``str`` enum, so we add members at runtime. Everything here is idempotent: the startup hook, an explicit
``import llamafactory_moe`` and the test-suite may all call it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

_lock = threading.RLock()


@dataclass(frozen=True)
class MethodSpec:
    name: str  # finetuning_type / peft method name, lower case
    config_cls: type
    model_cls: type


# name -> spec, filled by `register_method` calls at the bottom of each methods/<name>.py
METHODS: dict[str, MethodSpec] = {}


def extend_peft_type(name: str):
    """Return ``PeftType[NAME]``, adding the member if peft does not know it yet."""
    from peft.utils.peft_types import PeftType

    key = name.upper()
    with _lock:
        if key in PeftType.__members__:
            return PeftType[key]
        member = str.__new__(PeftType, key)
        member._name_ = key
        member._value_ = key
        member.__objclass__ = PeftType
        if hasattr(PeftType, "_add_member_"):  # Python >= 3.13
            PeftType._add_member_(key, member)
        else:
            type.__setattr__(PeftType, key, member)
            PeftType._member_map_[key] = member
        PeftType._member_names_.append(key)
        PeftType._value2member_map_[key] = member
        return member


def register_method(name: str, config_cls: type, model_cls: type) -> None:
    """Make ``name`` a PEFT method: enum member, config/tuner/prefix mappings. Idempotent."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    with _lock:
        peft_type = extend_peft_type(name)
        if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is None:
            register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
        METHODS[name] = MethodSpec(name=name, config_cls=config_cls, model_cls=model_cls)


METHODS_PACKAGE = "llamafactory_moe.methods"


_registration_deferred = False


def register_all_methods(_peft_module=None) -> None:
    """Import the methods package (each method file registers itself). Called by the startup hook once ``peft`` is
    imported. Imported by name: core discovers methods like plugins and never depends on their code.

    When ``peft`` is first imported *by* ``llamafactory_moe.core`` (a script that imports our core before peft), the
    methods cannot be imported yet: they need the half-initialised core. Registration is then deferred to the last
    line of ``core/__init__.py`` (``finish_deferred_registration``)."""
    import importlib
    import sys

    global _registration_deferred
    core = sys.modules.get("llamafactory_moe.core")
    if core is not None and getattr(getattr(core, "__spec__", None), "_initializing", False):
        _registration_deferred = True
        return
    importlib.import_module(METHODS_PACKAGE)


def finish_deferred_registration() -> None:
    global _registration_deferred
    if _registration_deferred:
        import importlib

        _registration_deferred = False
        importlib.import_module(METHODS_PACKAGE)


def public_classes() -> dict[str, type]:
    register_all_methods()
    classes: dict[str, type] = {}
    for spec in METHODS.values():
        classes[spec.config_cls.__name__] = spec.config_cls
        classes[spec.model_cls.__name__] = spec.model_cls
    return classes
