"""The README's key table, generated from the method config classes (``llamafactory-moe keys`` prints it).

One row per yaml key a user can write for a llamafactory-moe ``finetuning_type``: LLaMA-Factory's own LoRA keys that we
reuse, the shared ``moe_*`` keys, then each method's own keys. Defaults are the config classes' defaults, so the table
cannot drift from the code (a test compares it with README.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Shared fields read from LLaMA-Factory's own LoRA keys take LLaMA-Factory's default; the others the method's.
LLAMAFACTORY_DEFAULTS = {"expert_rank": 8, "expert_dropout": 0.0}
TABLE_ORDER = ("expert_rank", "lora_alpha", "expert_dropout", "num_experts", "top_k", "aux_loss_coef")
SHARED_MEANING = {
    "expert_rank": "rank of one expert (SMoRA: the total rank, every rank an expert; MoSLoRA: the LoRA rank)",
    "lora_alpha": "LoRA alpha; default 2 x `lora_rank` (LLaMA-Factory's); how it scales is per method (method docs)",
    "expert_dropout": "dropout on the adapter input",
    "num_experts": "experts per wrapped layer (D2MoRA: up-experts N)",
    "top_k": "experts (SMoRA: ranks) each token uses; = `moe_num_experts` means soft routing",
    "aux_loss_coef": "weight of the method's auxiliary loss (LLaMA-Factory's own key)",
}


def _format(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format(v) for v in value) + "]"
    return str(value)


def _defaults(config_cls) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def rows() -> list[tuple[str, str, str, str]]:
    """``(key, methods, default, meaning)`` rows, shared keys first."""
    from .core.peft_types import METHODS, register_all_methods

    register_all_methods()
    specs = list(METHODS.values())
    table = [("finetuning_type", "all", "—", "the method: " + ", ".join(f"`{s.name}`" for s in specs)),
             ("lora_target", "all", "—", "modules to wrap (LLaMA-Factory's key; `all` = every linear layer)")]
    from .core.config import SHARED_FIELD_TO_LF_KEY

    for field_name in TABLE_ORDER:
        key, lf_default = SHARED_FIELD_TO_LF_KEY[field_name], LLAMAFACTORY_DEFAULTS.get(field_name)
        users = [s for s in specs if field_name in s.config_cls.shared_fields]
        if field_name == "aux_loss_coef":
            users = [s for s in users if s.config_cls.aux_loss_terms]
            per_method = {s.name: s.config_cls.default_aux_loss_coef for s in users}
        elif lf_default is not None:
            per_method = {s.name: lf_default for s in users}
        else:
            per_method = {s.name: _defaults(s.config_cls).get(field_name) for s in users}
        values = set(map(_format, per_method.values()))
        default = values.pop() if len(values) == 1 else ", ".join(f"{m} {_format(v)}" for m, v in per_method.items())
        if field_name == "lora_alpha":
            default = "2 x `lora_rank`"
        table.append((key, ", ".join(s.name for s in users), default, SHARED_MEANING[field_name]))
    for spec in specs:
        defaults = _defaults(spec.config_cls)
        for f in dataclasses.fields(spec.config_cls):
            if f.name in spec.config_cls.own_field_names():
                meaning = " ".join(f.metadata.get("help", "").split()).replace("|", "\\|")
                table.append((f"moe_{f.name}", spec.name, _format(defaults.get(f.name)), meaning))
    return table


def markdown() -> str:
    lines = ["| key | methods | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{key}` | {methods} | {default} | {meaning} |" for key, methods, default, meaning in rows()]
    return "\n".join(lines) + "\n"


def write_readme(readme: str = "README.md") -> None:
    """Replace the README's ``<!-- key-table:start -->`` block with the generated table."""
    import re
    from pathlib import Path

    path = Path(readme)
    text = path.read_text()
    block = "<!-- key-table:start -->\n" + markdown() + "<!-- key-table:end -->"
    new, count = re.subn(r"<!-- key-table:start -->\n.*?<!-- key-table:end -->", lambda _m: block, text, flags=re.S)
    if count != 1:
        raise SystemExit(f"{readme}: expected one key-table block, found {count}")
    path.write_text(new)


def add_parser(sub) -> None:
    parser = sub.add_parser("keys", help="print every yaml key llamafactory-moe reads (markdown table, from the code)")
    parser.set_defaults(func=run)


def run(_args) -> int:
    print(markdown(), end="")
    return 0


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write-readme"]:
        write_readme()
    else:
        print(markdown(), end="")
