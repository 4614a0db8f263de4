"""One file per method. Importing this package registers every implemented method with PEFT.

``ALL_METHODS`` is the full list of ``finetuning_type`` values this project defines (DESIGN.md); a name listed here
whose module is not importable yet is reported as "not implemented yet" by the LLaMA-Factory integration.
"""

import importlib

ALL_METHODS = ("moelora", "smora", "smore", "d2mora", "goat", "adamole", "hydralora", "moslora")

IMPLEMENTED: list[str] = []
for _name in ALL_METHODS:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"{__name__}.{_name}":
            raise  # a real import error inside an existing method file must surface
    else:
        IMPLEMENTED.append(_name)
