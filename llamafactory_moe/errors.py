"""One base class for llamafactory-moe errors and one warning printer. Standard library only: the ``llamafactory-moe``
command, ``analysis/analyze.py`` and the start-up import hooks (``_autoload.py``) import it without pulling in torch
(``core/__init__`` does). ``core/errors.py`` re-exports both beside ``MoeConfigError``.
"""

from __future__ import annotations

import sys

WARNING_PREFIX = "llamafactory-moe: warning: "


class MoeError(Exception):
    """A user mistake (configuration, input files, a failed step): ``llamafactory-moe`` prints it as one line, no
    traceback, and exits 2."""


def warn(message: str) -> None:
    """Print one warning line to stderr: ``llamafactory-moe: warning: <message>``."""
    print(f"{WARNING_PREFIX}{message}", file=sys.stderr, flush=True)
