"""The habits of a well-kept library, run by CI through the suite: ruff (lint and format check) and mypy, configured
in pyproject.toml, pass on the package, the tests and the benchmarks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("cmd", [("ruff", "check", "."), ("ruff", "format", "--check", ".")], ids=["lint", "format"])
def test_ruff(cmd: tuple[str, ...]) -> None:
    proc = _run(*cmd)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_mypy() -> None:
    proc = _run("mypy")  # packages and strictness from [tool.mypy]
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
