"""Atomic folder writes: build in a temporary sibling, then rename into place; an existing folder is replaced
only when asked, and survives any failure."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from timm_anysize.core.errors import AnysizeError

__all__ = ["atomic_folder", "FolderExistsError"]


class FolderExistsError(AnysizeError, FileExistsError):
    """The output folder exists and is not empty, and overwriting was not asked for."""


@contextmanager
def atomic_folder(path: Union[str, os.PathLike], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it becomes ``path``, on failure it is removed.

    Args:
        path: The final folder.
        overwrite: Replace an existing non-empty folder (it is kept until the new one is in place).

    Raises:
        FolderExistsError: ``path`` exists, is not an empty folder, and ``overwrite`` is False.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "export"
        >>> with atomic_folder(out) as tmp:
        ...     _ = (tmp / "a.txt").write_text("hi")
        >>> sorted(p.name for p in out.iterdir())
        ['a.txt']
    """
    final = Path(path).absolute()
    occupied = final.exists() and (not final.is_dir() or any(final.iterdir()))
    if occupied and not overwrite:
        raise FolderExistsError(f"{final}: exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            backup = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            final.rename(backup)
            try:
                tmp.rename(final)
            except BaseException:
                backup.rename(final)
                raise
            shutil.rmtree(backup) if backup.is_dir() else backup.unlink()
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
