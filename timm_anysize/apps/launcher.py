"""Run an unmodified script (timm's train.py, validate.py, ...) with the variants registered first.

timm has no plugin entry points, so a script that only takes a model name cannot see YAML variants unless
something imports timm_anysize in its process first. ``timm-anysize run`` is that something; under torchrun,
every worker runs it before the script.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Sequence

from timm_anysize.registry import register_yaml

__all__ = ["run_script"]


def run_script(script: str, args: Sequence[str], configs: Sequence[str] = ()) -> None:
    """Register ``configs`` (the shipped ones and ``$TIMM_ANYSIZE_CONFIGS`` are registered on import), then run
    ``script`` as ``__main__`` with ``sys.argv = [script, *args]``, as ``python script args...`` would.

    Example:
        >>> import tempfile, pathlib
        >>> s = pathlib.Path(tempfile.mkdtemp()) / "s.py"
        >>> _ = s.write_text("import sys, timm; print(sys.argv[1:], timm.is_model('vit_tiny_patch4_64'))")
        >>> run_script(str(s), ["--model", "vit_tiny_patch4_64"])
        ['--model', 'vit_tiny_patch4_64'] True
    """
    for path in configs:
        register_yaml(path)
    path = Path(script)
    if not path.is_file():
        raise FileNotFoundError(f"{script}: no such script")
    old_argv = sys.argv
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(path.resolve().parent))  # as `python script.py` puts the script's folder first
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = old_argv
        if sys.path and sys.path[0] == str(path.resolve().parent):
            sys.path.pop(0)
