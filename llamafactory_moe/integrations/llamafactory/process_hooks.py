"""Process-wide hooks installed once, before the first patch applies (a step of its own, see ``__init__``).

Mirrors ``llamafactory.extras.logging`` (we share its log handler) and sets ``sys.excepthook`` so a user mistake
(``MoeConfigError``) prints one line, not a traceback. Patches nothing.
"""

from __future__ import annotations

import sys

from ...core.errors import MoeConfigError


def install_process_hooks() -> None:
    """Once per process: print MoeConfigError as one line (no traceback) and route our INFO logs like
    LLaMA-Factory's."""
    if getattr(sys.excepthook, "_llamafactory_moe", False):
        return
    previous = sys.excepthook

    def excepthook(exc_type, exc, tb):
        if issubclass(exc_type, MoeConfigError):
            print(f"llamafactory-moe: invalid configuration: {exc}", file=sys.stderr)
            return
        previous(exc_type, exc, tb)

    excepthook._llamafactory_moe = True
    sys.excepthook = excepthook
    _share_llamafactory_log_handler()


def _share_llamafactory_log_handler() -> None:
    """Print our ``llamafactory_moe.*`` INFO logs (adapter created/loaded, GOAT's SVD time) the way LLaMA-Factory
    prints its own: its handler sits on the ``llamafactory`` logger only, so ours would fall through to Python's
    last-resort handler, which drops INFO."""
    import logging as std_logging

    try:
        from llamafactory.extras import logging as lf_logging

        library_logger = lf_logging.get_logger()  # configures LLaMA-Factory's handler and level
        handler = getattr(lf_logging, "_default_handler", None)
    except Exception:  # an upstream change only costs us INFO lines
        return
    ours = std_logging.getLogger("llamafactory_moe")
    if handler is not None and handler not in ours.handlers:
        ours.addHandler(handler)
        ours.setLevel(library_logger.getEffectiveLevel())
        ours.propagate = False
