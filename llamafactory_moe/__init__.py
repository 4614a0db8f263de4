"""llamafactory-moe: mixture-of-LoRA-experts adapters as PEFT tuners for stock LLaMA-Factory and OpenCompass.

Importing this package is cheap (standard library only): it installs post-import hooks, so that

* ``import peft`` registers our PEFT methods (``PeftModel.from_pretrained`` loads our checkpoints), and
* importing LLaMA-Factory applies the runtime patches listed in ``patches/README.md``.

The wheel's ``llamafactory_moe_startup.pth`` imports this package at interpreter start, so stock ``llamafactory-cli``,
its torchrun children and OpenCompass workers see our adapters without any code change.
``LLAMAFACTORY_MOE_DISABLE=1`` turns the start-up import off; an explicit ``import llamafactory_moe`` still works.

Method classes are available lazily, e.g. ``from llamafactory_moe import SMoRAConfig``.
"""

from __future__ import annotations

__version__ = "0.1.0"

try:
    from . import _autoload

    _autoload.install()
except Exception as _exc:  # never break interpreter start-up
    from .errors import warn as _warn

    _warn(f"import hooks not installed ({_exc!r}); stock behaviour unchanged.")


def __getattr__(name: str):
    # Lazy access to config / model classes: importing them pulls in torch and peft, which we must not do at start-up.
    from .core.peft_types import public_classes

    classes = public_classes()
    if name in classes:
        return classes[name]
    raise AttributeError(f"module 'llamafactory_moe' has no attribute '{name}'")
