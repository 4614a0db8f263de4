"""The code style the project keeps (pyproject.toml `[tool.ruff]`): pycodestyle, pyflakes and import order, enforced
here so a violation fails the suite like any other defect."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "llamafactory_moe", "tests", "scripts",
                           "eval_configs"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "All checks passed" in proc.stdout  # ruff really checked (a missing module would fail above)
