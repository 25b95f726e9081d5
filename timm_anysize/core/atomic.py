"""Atomic folder writes: build in a temporary sibling, then rename into place; an existing folder is replaced
only when asked, and survives any failure. Folders are created with the user's umask (as ``mkdir`` would), not the
private 0700 of ``tempfile.mkdtemp``: an export is meant to be shared."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from timm_anysize.core.errors import AnysizeError

__all__ = ["atomic_folder", "check_folder_free", "FolderExistsError"]


class FolderExistsError(AnysizeError, FileExistsError):
    """The output folder exists and is not empty, and overwriting was not asked for."""


def check_folder_free(path: Union[str, os.PathLike], overwrite: bool = False) -> Path:
    """The absolute ``path``, after checking that a write there may go ahead: call it before any slow or failing
    work (reading weights), so an occupied folder is refused first.

    Raises:
        FolderExistsError: ``path`` exists, is not an empty folder, and ``overwrite`` is False.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp())
        >>> check_folder_free(out) == out  # empty: free
        True
        >>> _ = (out / "a.txt").write_text("hi")
        >>> check_folder_free(out, overwrite=True) == out
        True
        >>> check_folder_free(out)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        timm_anysize.core.atomic.FolderExistsError: ...: exists and is not empty; pass overwrite=True (--overwrite) to replace it
    """
    final = Path(path).absolute()
    occupied = final.exists() and (not final.is_dir() or any(final.iterdir()))
    if occupied and not overwrite:
        raise FolderExistsError(f"{final}: exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    return final


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
    final = check_folder_free(path, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir(mode=0o777)  # less the umask, as for any folder the user makes (mkdtemp's would be 0700)
    try:
        yield tmp
        _files_as_umask(tmp)
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


def _files_as_umask(folder: Path) -> None:
    """Give every file in ``folder`` the permissions of a file the user makes (0666 less the umask): a writer that
    saves through a private temporary file (0600, as safetensors' does) would otherwise leave it unreadable to the
    group and others. The umask is read off ``folder``, made with 0777 less the umask: no process-wide umask swap."""
    mode = folder.stat().st_mode & 0o777
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod((mode & 0o666) | (path.stat().st_mode & mode & 0o111))
