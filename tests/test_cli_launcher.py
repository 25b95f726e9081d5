"""`timm-anysize run` configures no logging of its own: a script that sets up logging (timm's train.py and
validate.py call timm.utils.setup_default_logging) prints each record once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import logging, timm.utils
timm.utils.setup_default_logging()
logging.getLogger("train").info("one record")
"""


def test_a_script_that_sets_up_logging_prints_each_record_once(tmp_path):
    (tmp_path / "train.py").write_text(SCRIPT)
    exe = shutil.which("timm-anysize", path=str(Path(sys.executable).parent))
    assert exe is not None
    proc = subprocess.run([exe, "run", str(tmp_path / "train.py")], capture_output=True, text=True, env=os.environ)
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout + proc.stderr).count("one record") == 1, proc.stdout + proc.stderr
