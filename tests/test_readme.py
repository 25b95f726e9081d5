"""The README's offline quickstart runs and prints what the README says it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs_and_prints_what_it_says(tmp_path):
    text = README.read_text()
    section = text.split("### Quickstart that runs offline", 1)[1]
    code, printed = re.findall(r"```(?:python)?\n(.*?)```", section, flags=re.S)[:2]
    # The README writes its checkpoint to /tmp; the test writes it to its own folder (parallel runs never share it).
    assert "/tmp/" in code and "/tmp/" in printed
    code, printed = code.replace("/tmp/", f"{tmp_path}/"), printed.replace("/tmp/", f"{tmp_path}/")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert out.strip() == (printed.strip() + "\ntorch.Size([2, 10])")
