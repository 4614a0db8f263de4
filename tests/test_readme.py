"""README.md stays true: the key table is the one the code generates, and the two set-up commands exist."""

from __future__ import annotations

import re
from pathlib import Path

from llamafactory_moe.key_table import markdown

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _section(name: str) -> str:
    match = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", README, re.S)
    assert match, f"README.md has no <!-- {name}:start --> ... <!-- {name}:end --> block"
    return match.group(1)


def test_key_table_matches_the_config_classes():
    assert _section("key-table") == markdown(), "regenerate with: python -m llamafactory_moe.key_table --write-readme"


def test_every_key_in_the_table_is_accepted_by_the_argument_parser():
    from llamafactory_moe.integrations.arguments import method_specific_fields

    own_keys = set(method_specific_fields())
    table_keys = {row.split("`")[1] for row in markdown().splitlines()[2:]}
    assert {k for k in table_keys if k.startswith("moe_") and k not in ("moe_num_experts", "moe_top_k",
                                                                         "moe_aux_loss_coef")} == own_keys


def test_setup_commands_exist():
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert f"bash {script}" in README and (REPO / script).is_file()
    assert "exec bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_key_table_lists_every_shared_field():
    from llamafactory_moe.core.config import SHARED_FIELD_TO_LF_KEY
    from llamafactory_moe.key_table import TABLE_ORDER

    assert sorted(TABLE_ORDER) == sorted(SHARED_FIELD_TO_LF_KEY)
