"""A small on-disk cache for built assets (tiny test model, converted SmolLM2), safe under concurrent processes.

An entry is a directory that appears only by an atomic ``os.rename`` of a finished build, so its existence means it
is complete. A per-entry lock file (``fcntl.flock`` where available) keeps two processes, e.g. pytest-xdist workers
or a benchmark and a test run, from doing the same build twice; without ``fcntl`` the rename alone still keeps the
entry consistent (the loser discards its copy).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

CACHE_ENV = "LLAMAFACTORY_MOE_CACHE"


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """``override``, else ``$LLAMAFACTORY_MOE_CACHE``, else ``~/.cache/llamafactory_moe``."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llamafactory_moe"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: rely on the atomic rename only
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def get_or_build(entry: Path, build: Callable[[Path], None]) -> Path:
    """Return ``entry``, first calling ``build(tmp_dir)`` and renaming ``tmp_dir`` to ``entry`` if it does not exist."""
    if entry.is_dir():
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(entry.parent / f".{entry.name}.lock"):
        if entry.is_dir():  # another process finished while we waited for the lock
            return entry
        # Same parent directory as the entry, so the final rename cannot cross file systems. mkdtemp makes a private
        # (0700) directory; the entry itself is a plain mkdir inside it, so it gets the user's umask like any folder.
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
        try:
            staged = tmp / entry.name
            staged.mkdir()
            build(staged)
            try:
                os.rename(staged, entry)
            except OSError:
                if not entry.is_dir():
                    raise
                # Lost a race with a lock-less process: its entry is complete, ours is redundant.
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry
