"""`timm-anysize run` configures no logging of its own: a script that sets up logging (timm's train.py and
validate.py call timm.utils.setup_default_logging) prints each record once; -v and -q set only timm-anysize's own
level, so the script's handlers show its DEBUG records (the size caches' hit rates) or none of its INFO ones."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import timm
import torch

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


SIZES_SCRIPT = """
import timm, timm.utils, torch
timm.utils.setup_default_logging()
model = timm.create_model("launcher_verbose_vit", pretrained=True).eval()
with torch.no_grad():
    for size in (32, 48, 32, 16):
        model(torch.rand(1, 3, size, size))
"""


def test_verbose_shows_the_cache_hit_rates_and_quiet_hides_info(tmp_path):
    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "weights.pt")
    (tmp_path / "v.yaml").write_text(
        "variants:\n  launcher_verbose_vit:\n    base: test_vit\n    img_size: 64\n    patch_size: 8\n"
        "    pretrained: {file: weights.pt}\n"
    )
    (tmp_path / "sizes.py").write_text(SIZES_SCRIPT)
    exe = shutil.which("timm-anysize", path=str(Path(sys.executable).parent))
    assert exe is not None
    logs = {}
    for flag in ("", "-v", "-q"):
        argv = [exe, "run", *([flag] if flag else []), "-c", "v.yaml", "sizes.py"]
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=os.environ)
        assert proc.returncode == 0, proc.stderr
        logs[flag] = proc.stdout + proc.stderr
    loaded = "launcher_verbose_vit: loaded from file"
    assert loaded in logs[""] and "size cache miss" not in logs[""]
    misses = [line for line in logs["-v"].splitlines() if "size cache miss" in line]
    # 32 (miss), 48 (miss), 32 (hit), 16 (miss): the third miss reports the one hit
    assert len(misses) == 3 and "hit rate 1/4 (25%)" in misses[-1], logs["-v"]
    assert loaded not in logs["-q"] and "size cache miss" not in logs["-q"]
