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


def test_the_plain_peft_loop_runs_as_written(tiny_model, tmp_path):
    """The README's own-loop block, run as a user runs it (a fresh interpreter, their folder), with the tiny model in
    place of SmolLM2: it trains (B moves from its zero init), the step updates ran (SMoRA's bias left 0) and the saved
    checkpoint is a standard peft SMORA adapter that reloads."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.conftest import BASE_ENV

    block = re.search(r"<!-- peft-loop:start -->\n```python\n(.*?)```\n<!-- peft-loop:end -->", README, re.S)
    assert block, "README.md has no peft-loop block"
    code = block.group(1)
    assert code.count('"HuggingFaceTB/SmolLM2-135M-Instruct"') == 1
    script = tmp_path / "loop.py"
    script.write_text(code.replace('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(tiny_model)))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=BASE_ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["0", "1", "2"], proc.stdout
    adapter = tmp_path / "smora-adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "SMORA"
    weights = load_file(adapter / "adapter_model.safetensors")
    biases = [v for k, v in weights.items() if k.endswith("smora_bias")]
    ups = [v for k, v in weights.items() if k.endswith("smora_B")]
    assert biases and ups and len(biases) == len(ups)
    assert all(b.abs().max() > 0 for b in biases)  # apply_optimizer_step_updates really updated every layer
    assert all(b.abs().max() > 0 for b in ups)  # and the optimizer trained the experts (B starts at zero)
