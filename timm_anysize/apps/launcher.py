"""Run an unmodified script (timm's train.py, validate.py, ...) with the variants registered first.

timm has no plugin entry points, so a script that only takes a model name cannot see YAML variants unless
something imports timm_anysize in its process first. ``timm-anysize run`` is that something; under torchrun,
every worker runs it before the script. It configures no logging: the script's own setup (timm's
``setup_default_logging``) is the only one, so each record prints once.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Sequence

from timm_anysize.core.errors import AnysizeError
from timm_anysize.registry import register_yaml

__all__ = ["run_script", "script_path"]


def script_path(script: str) -> Path:
    """The script to run, checked before anything runs.

    Raises:
        AnysizeError: ``script`` is not a file.

    Example:
        >>> script_path("/nonexistent/train.py")
        Traceback (most recent call last):
        ...
        timm_anysize.core.errors.AnysizeError: /nonexistent/train.py: no such script
    """
    path = Path(script)
    if not path.is_file():
        raise AnysizeError(f"{script}: no such script" + (" (a folder)" if path.is_dir() else ""))
    return path


def run_script(script: str, args: Sequence[str], configs: Sequence[str] = ()) -> None:
    """Register ``configs`` (the shipped ones and ``$TIMM_ANYSIZE_CONFIGS`` are registered on import), then run
    ``script`` as ``__main__`` with ``sys.argv = [script, *args]``, as ``python script args...`` would.

    Raises:
        AnysizeError: A config is invalid or the script does not exist (before the script runs); whatever the
            script raises is raised as it is.

    Example:
        >>> import tempfile, pathlib
        >>> s = pathlib.Path(tempfile.mkdtemp()) / "s.py"
        >>> _ = s.write_text("import sys, timm; print(sys.argv[1:], timm.is_model('vit_tiny_patch4_64'))")
        >>> run_script(str(s), ["--model", "vit_tiny_patch4_64"])
        ['--model', 'vit_tiny_patch4_64'] True
    """
    for config in configs:
        register_yaml(config)
    path = script_path(script)
    old_argv = sys.argv
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(path.resolve().parent))  # as `python script.py` puts the script's folder first
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = old_argv
        if sys.path and sys.path[0] == str(path.resolve().parent):
            sys.path.pop(0)
