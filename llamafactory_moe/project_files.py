"""The project's example files: ``configs/`` (LLaMA-Factory yaml), ``eval_configs/`` (OpenCompass configs) and
``data/`` (the ``dataset_info.json`` files the configs name), from a checkout or from the installed wheel, and the
``llamafactory-moe copy-configs`` command that copies them into a folder of the user's.

The wheel carries the three folders as ``llamafactory_moe/project_files/<folder>`` (pyproject's force-include), so a
``pip install`` user gets the same files a checkout has::

    llamafactory-moe copy-configs my_run && cd my_run
    llamafactory-cli train configs/llama3_smora.yaml
    opencompass eval_configs/flan_eval.py

Standard library only (the CLI imports it before torch).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

FOLDERS = ("configs", "eval_configs", "data")
_PACKAGE_DIR = Path(__file__).resolve().parent


def project_folder(name: str) -> Path:
    """``configs``, ``eval_configs`` or ``data``: inside the installed wheel, else in the source checkout (an editable
    install)."""
    if name not in FOLDERS:
        raise ValueError(f"unknown project folder {name!r}; one of {FOLDERS}")
    for candidate in (_PACKAGE_DIR / "project_files" / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"llamafactory-moe's {name}/ folder is missing from {_PACKAGE_DIR / 'project_files'} "
                            f"and {_PACKAGE_DIR.parent}; reinstall the package")


def project_file(folder: str, relative: str) -> Path:
    """One shipped file, e.g. ``project_file("eval_configs", "commonsense_eval.py")``."""
    return project_folder(folder) / relative


def _files(folder: str) -> list[tuple[Path, Path]]:
    """(source, path relative to the destination) for every file of a project folder, caches excluded."""
    root = project_folder(folder)
    return [(path, Path(folder) / path.relative_to(root)) for path in sorted(root.rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts]


def copy_configs(destination: Path, force: bool = False) -> list[Path]:
    """Copy configs/, eval_configs/ and data/ into ``destination``. Existing files are left alone unless ``force``:
    a conflict raises ``FileExistsError`` before anything is written."""
    pairs = [pair for folder in FOLDERS for pair in _files(folder)]
    conflicts = [relative for _, relative in pairs if (destination / relative).exists()]
    if conflicts and not force:
        shown = ", ".join(str(p) for p in conflicts[:3]) + (f" and {len(conflicts) - 3} more" if len(conflicts) > 3
                                                             else "")
        raise FileExistsError(f"{destination} already has {shown}; pass --force to overwrite them, or choose "
                              "another folder")
    written = []
    for source, relative in pairs:
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        written.append(target)
    return written


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "copy-configs", help="copy the shipped configs/, eval_configs/ and data/ (dataset_info.json) into a folder",
        description="Copy the example LLaMA-Factory configs (configs/), the OpenCompass configs (eval_configs/) and "
                    "the dataset definitions they name (data/) into DEST, so `llamafactory-cli train "
                    "configs/<file>.yaml` and `opencompass eval_configs/<file>.py` run from there.")
    parser.add_argument("destination", nargs="?", default=".", help="folder to copy into (default: the current one)")
    parser.add_argument("--force", action="store_true", help="overwrite files that already exist there")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    destination = Path(args.destination).expanduser()
    try:
        written = copy_configs(destination, force=args.force)
    except (FileExistsError, FileNotFoundError) as exc:
        print(f"llamafactory-moe copy-configs: {exc}", file=sys.stderr)
        return 2
    counts = {folder: sum(1 for p in written if p.relative_to(destination).parts[0] == folder) for folder in FOLDERS}
    listing = ", ".join(f"{folder}/ ({n} files)" for folder, n in counts.items())
    print(f"copied into {destination.resolve()}: {listing}")
    print("next, from that folder:\n"
          "  llamafactory-cli train configs/llama3_smora.yaml\n"
          "  MOE_BASE_MODEL=<base model> MOE_ADAPTER=<output_dir> MOE_EVAL_DATA=<data root> "
          "opencompass eval_configs/flan_eval.py")
    return 0
