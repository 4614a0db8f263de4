"""One error base class and one warning printer (`llamafactory_moe/errors.py`, re-exported by `core/errors.py`)."""

from __future__ import annotations


def test_user_errors_share_one_base():
    from llamafactory_moe.analysis.analyze import AnalyzeError
    from llamafactory_moe.core.errors import MoeConfigError, MoeError

    assert issubclass(MoeConfigError, MoeError) and issubclass(MoeConfigError, ValueError)
    assert issubclass(AnalyzeError, MoeError)


def test_cli_prints_a_moe_error_as_one_line_for_any_command(monkeypatch, capsys):
    from llamafactory_moe import cli
    from llamafactory_moe.core.errors import MoeConfigError

    def fail(_args):
        raise MoeConfigError("moe_top_k", 3, "must be <= `moe_num_experts` (2)")

    from llamafactory_moe import key_table

    monkeypatch.setattr(key_table, "run", fail)
    assert cli.main(["keys"]) == 2
    assert capsys.readouterr().err == "llamafactory-moe keys: `moe_top_k` (3) must be <= `moe_num_experts` (2)\n"


def test_warnings_have_one_prefix(capsys):
    from llamafactory_moe import _autoload
    from llamafactory_moe.errors import warn

    warn("first")
    _autoload._warn_once("second")
    _autoload._warn_once("second")
    assert capsys.readouterr().err == "llamafactory-moe: warning: first\nllamafactory-moe: warning: second\n"
