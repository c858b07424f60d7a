"""The checkout passes `ruff check` with the project's rules (pyproject.toml: pyflakes, pycodestyle's errors and
warnings, bugbear): unused imports and names, undefined names, closures that capture a loop variable by mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO

RUFF = Path(sys.executable).with_name("ruff")


def test_sources_pass_ruff():
    result = subprocess.run([str(RUFF), "check", "--no-cache", "--output-format", "concise", "."], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
