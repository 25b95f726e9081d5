"""Weight files by their real format: safetensors, PyTorch pickles (read ``weights_only``), JAX/big_vision ``.npz``.

The format comes from the file (suffix, then content), never from a pretrained cfg's ``custom_load`` flag.
Pickles are only read with ``torch.load(weights_only=True)``, memory-mapped; safetensors is preferred everywhere. A
``save_pretrained`` folder means its weight file, and the transformers ``config.json`` beside a weight file is read
here too (:func:`transformers_config`). Where the weights come from is :mod:`timm_anysize.weight_downloads`; how a
variant's checkpoint is read into timm's names is :mod:`timm_anysize.source_weights`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn

from timm_anysize.core.errors import WeightsError
from timm_anysize.core.safetensors_io import read_safetensors
from timm_anysize.origins import unwrap_state_dict

__all__ = [
    "detect_format",
    "read_checkpoint",
    "read_state_dict",
    "read_npz_state_dict",
    "transformers_config",
    "HUB_FILENAMES",
]

_logger = logging.getLogger(__name__)
StateDict = dict[str, torch.Tensor]
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
# The weight files of a Hub repo or a save_pretrained folder, in the order timm tries them.
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")


def detect_format(path: Union[str, os.PathLike]) -> str:
    """Return ``'safetensors'``, ``'torch'`` or ``'npz'`` for a weight file, from its suffix or its content.

    Example:
        >>> detect_format("weights/vit.safetensors")
        'safetensors'
    """
    p = Path(path)
    if p.is_dir():  # a save_pretrained folder: its weight file is read by read_source_state_dict
        return "torch" if _folder_weights(p).suffix != ".safetensors" else "safetensors"
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".npz":
        return "npz"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    try:
        with open(p, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise WeightsError(f"{p}: cannot read the weight file: {e}") from e
    if head[:2] == b"PK":
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
        return "npz" if names and all(n.endswith(".npy") for n in names) else "torch"
    if head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    raise WeightsError(
        f"{p}: unknown weight format (suffix {suffix!r}); use .safetensors, .pth/.bin (PyTorch state dict) or .npz"
    )


def _folder_weights(folder: Path) -> Path:
    """The weight file of a ``save_pretrained`` folder (``model.safetensors``, else ``pytorch_model.bin``)."""
    for name in HUB_FILENAMES:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(
        f"{folder}: a folder without {' or '.join(HUB_FILENAMES)}; point pretrained.file at the weight file"
    )


def read_checkpoint(path: Union[str, os.PathLike]) -> Any:
    """Read a weight file as saved, wrappers included (``{'state_dict': ..., 'meta': ...}``, DINO's
    ``{'teacher': ..., 'student': ..., 'args': Namespace}``); a folder means its ``model.safetensors``.

    Raises:
        WeightsError: Missing, unreadable, corrupt, or pickled code; the message names the file.

    Example:
        >>> import tempfile, torch
        >>> p = tempfile.mkdtemp() + "/w.pth"
        >>> torch.save({"epoch": 1, "model": {"a": torch.zeros(2)}}, p)
        >>> sorted(read_checkpoint(p))
        ['epoch', 'model']
    """
    p = Path(path)
    if p.is_dir():
        p = _folder_weights(p)
    if not p.is_file():
        raise WeightsError(f"{p}: weight file not found (resolved to {p.resolve()}); check pretrained.file")
    fmt = detect_format(p)
    if fmt == "npz":
        raise WeightsError(f"{p}: .npz weights need the model layout; use read_npz_state_dict")
    if fmt == "safetensors":
        return read_safetensors(p)
    try:
        # DINO's training checkpoints carry their argparse.Namespace; it holds plain values and runs no code.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return _torch_load(p)
    except Exception as e:  # UnpicklingError for refused globals, RuntimeError/EOFError for truncated files
        raise WeightsError(
            f"{p}: cannot be read as a PyTorch state dict with weights_only=True ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); timm-anysize never unpickles code: re-save the "
            f"weights with torch.save(model.state_dict()) or safetensors"
        ) from e


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped (``mmap=True``): tensors are read from the page cache as they
    are used, and the model takes their storage, so loading holds the weights once. Legacy (pre-zip, PyTorch < 1.6)
    files cannot be mapped and are read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zipfile" not in str(e):
            raise
        _logger.info("%s: a legacy (non-zip) torch.save file: read whole (re-save it to load memory-mapped)", path)
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: Union[str, os.PathLike]) -> StateDict:
    """Read a PyTorch (``.pth``/``.bin``) or safetensors file into a CPU state dict.

    Args:
        path: The weight file.

    Returns:
        Key -> tensor, unwrapped from ``state_dict``/``model`` containers and ``module.`` prefixes.

    Raises:
        WeightsError: Missing, unreadable, corrupt, pickled code, or not a state dict; the message names the file.

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> p = tempfile.mkdtemp() + "/w.safetensors"
        >>> safetensors.torch.save_file({"a": torch.zeros(2)}, p)
        >>> list(read_state_dict(p))
        ['a']
    """
    return unwrap_state_dict(read_checkpoint(path), str(Path(path)))[0]


def read_npz_state_dict(path: Union[str, os.PathLike], build_source_model: Callable[[], nn.Module]) -> StateDict:
    """Read a JAX/big_vision ``.npz`` checkpoint the way timm does, into a state dict at the source geometry.

    timm reads npz files only through ``model.load_pretrained``; so we build the model at the *source* geometry
    (nothing is resampled), fill it with NaN, load, and keep exactly the tensors the file set.

    Args:
        path: The ``.npz`` file.
        build_source_model: Builds the base model at the weights' geometry on the CPU.

    Returns:
        The tensors the file provided, in timm's layout.

    Raises:
        WeightsError: Missing or corrupt file, or a layout this family's ``load_pretrained`` cannot read.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: weight file not found (resolved to {p.resolve()}); check pretrained.file")
    model = build_source_model()
    load_pretrained = getattr(model, "load_pretrained", None)  # timm's npz reader, a method of the model class
    if not callable(load_pretrained):
        raise WeightsError(f"{p}: {type(model).__name__} cannot read .npz weights; convert them to safetensors")
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.fill_(math.nan)
    try:
        load_pretrained(str(p))
    except Exception as e:  # timm raises KeyError/ValueError/zipfile errors on foreign layouts
        raise WeightsError(
            f"{p}: not a JAX/big_vision checkpoint that {type(model).__name__}.load_pretrained can read "
            f"({type(e).__name__}: {e})"
        ) from e
    # A tensor the file did not set is still NaN everywhere; everything else came from the file.
    return {k: v for k, v in model.state_dict().items() if not (v.is_floating_point() and torch.isnan(v).all())}


def transformers_config(path: Union[str, os.PathLike]) -> Optional[dict]:
    """The ``config.json`` of a transformers folder (next to the weight file), if there is one.

    Returns:
        The parsed config, or None when there is no ``config.json`` or it is not a transformers config (timm's
        own ``config.json`` has no ``model_type``).

    Raises:
        WeightsError: The file exists but is not JSON; names it.

    Example:
        >>> import json, tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "config.json").write_text(json.dumps({"model_type": "vit", "image_size": 64}))
        >>> transformers_config(d / "model.safetensors")["image_size"]
        64
    """
    path = Path(path)
    cfg = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{cfg}: not readable JSON ({e}); fix or remove it") from e
    return data if isinstance(data, dict) and "model_type" in data else None
