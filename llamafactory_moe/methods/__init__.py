"""One file per method. Importing this package imports every ``methods/<name>.py`` (discovered, not listed), and each
registers itself with PEFT by calling ``register_method`` at its bottom.

The registry (``llamafactory_moe.core.peft_types.METHODS``) is the only list of methods: adding a method is adding a
file here. A module whose name starts with ``_`` is a helper, not a method. An import error inside a method file
propagates; a method file that registers nothing is an error.
"""

import importlib
import pkgutil

from ..core.errors import MoeConfigError
from ..core.peft_types import METHODS, sort_methods


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if not any(spec.config_cls.__module__ == module.__name__ for spec in METHODS.values()):
            raise MoeConfigError(f"{module.__name__}", module.__file__, "registers no method",
                                 "end the file with `register_method(<Config>, <Model>)`, or name it `_<helper>.py`")
    sort_methods()


_discover()
