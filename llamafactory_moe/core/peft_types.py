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


# name -> spec: the one list of methods. Filled by `register_method` calls at the bottom of each methods/<name>.py,
# which `llamafactory_moe.methods` discovers and imports; ordered by `sort_methods`.
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


def _check_names(name: str, config_cls: type, model_cls: type) -> None:
    """A method's prefix, adapter-layer and buffer names all derive from its name (peft finds adapter tensors by
    prefix, and two methods must never share a tensor name). One-line ``MoeConfigError`` otherwise."""
    from .errors import MoeConfigError

    where = f"{config_cls.__module__}.{config_cls.__name__}.method_name"
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise MoeConfigError(where, name, "must be a lower-case Python identifier (it is the `finetuning_type`)",
                             "set `method_name: ClassVar[str] = \"<name>\"` on the config class")
    prefix = f"{name}_"
    if getattr(model_cls, "prefix", None) != prefix:
        raise MoeConfigError(f"{model_cls.__name__}.prefix", getattr(model_cls, "prefix", None),
                             f"must be `{prefix}` (the method name + '_')", method=name)
    layer_cls = getattr(model_cls, "tuner_layer_cls", None)
    for attr in ("adapter_layer_names", "buffer_names"):
        for tensor_name in getattr(layer_cls, attr, ()):
            if not tensor_name.startswith(prefix):
                raise MoeConfigError(f"{getattr(layer_cls, '__name__', layer_cls)}.{attr}", tensor_name,
                                     f"must start with `{prefix}`", "derive every adapter tensor name from the method "
                                     "name", method=name)


def register_method(config_cls: type, model_cls: type) -> None:
    """Make ``config_cls.method_name`` a PEFT method: enum member, config/tuner/prefix mappings. Idempotent.

    Called at the bottom of each ``methods/<name>.py``. The name comes from the config class; the tuner's ``prefix``
    and its layer's adapter-layer and buffer names must derive from it."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    name = config_cls.method_name
    _check_names(name, config_cls, model_cls)
    with _lock:
        peft_type = extend_peft_type(name)
        if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is None:
            register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
        METHODS[name] = MethodSpec(name=name, config_cls=config_cls, model_cls=model_cls)


def sort_methods() -> None:
    """Order ``METHODS`` by the config classes' ``listing_order`` (then name): the order of every listing (help
    texts, the README key table, default method lists). Called once discovery has imported every method file."""
    with _lock:
        ordered = sorted(METHODS.items(), key=lambda kv: (getattr(kv[1].config_cls, "listing_order", 0), kv[0]))
        METHODS.clear()
        METHODS.update(ordered)


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
