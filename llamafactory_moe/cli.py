"""``llamafactory-moe``: the demo, the key table, ``compare``, ``analyze`` and ``copy-configs``.

Every command is a module with ``add_parser(subparsers)`` (its arguments, ``set_defaults(func=run)``) and
``run(args) -> exit code``; a ``MoeError`` (a user mistake) is printed here as one line, exit 2, for every command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import MoeError

# (module, relative to this package), in the order `llamafactory-moe --help` lists them
COMMANDS = (".demo", ".key_table", ".compare", ".analysis.analyze", ".project_files")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llamafactory-moe", description="Mixture-of-LoRA-experts methods for stock "
                                     "LLaMA-Factory: demo, key table, method comparison, router analysis, configs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        importlib.import_module(module, __package__).add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MoeError as exc:  # a user mistake, for every command: one line, no traceback
        print(f"llamafactory-moe {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
