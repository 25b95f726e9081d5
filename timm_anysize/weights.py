"""Reading source weights: local files by their real format, Hub repos and URLs through their caches.

The format comes from the file (suffix, then content), never from a pretrained cfg's ``custom_load`` flag.
Pickles are only read with ``torch.load(weights_only=True)``; safetensors is preferred everywhere.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn

from timm_anysize.core.errors import WeightsError
from timm_anysize.core.version import __version__
from timm_anysize.origins import check_against_plan, detect_layout, unwrap_checkpoint

__all__ = [
    "detect_format",
    "read_state_dict",
    "read_checkpoint",
    "read_source_state_dict",
    "SourceStateDict",
    "read_npz_state_dict",
    "download_hub_weights",
    "download_url_weights",
]

StateDict = dict[str, torch.Tensor]
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
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


def _unwrap(obj: Any, path: Path) -> StateDict:
    """Find the tensor dict inside a training checkpoint (``state_dict``/``model`` wrappers, DDP prefixes)."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{path}: holds {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:5]))}; save a state dict")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _folder_weights(folder: Path) -> Path:
    """The weight file of a ``save_pretrained`` folder (``model.safetensors``, else ``pytorch_model.bin``)."""
    for name in HUB_FILENAMES:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"{folder}: a folder without {' or '.join(HUB_FILENAMES)}; point pretrained.file at the "
                       f"weight file")


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
        import safetensors.torch

        try:
            return dict(safetensors.torch.load_file(str(p), device="cpu"))
        except Exception as e:  # safetensors raises its own SafetensorError, OSError or RuntimeError
            raise WeightsError(f"{p}: not a readable safetensors file ({e}); re-save it or check the download") from e
    try:
        # DINO's training checkpoints carry their argparse.Namespace; it holds plain values and runs no code.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for refused globals, RuntimeError/EOFError for truncated files
        raise WeightsError(
            f"{p}: cannot be read as a PyTorch state dict with weights_only=True ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); timm-anysize never unpickles code: re-save the "
            f"weights with torch.save(model.state_dict()) or safetensors"
        ) from e


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
    return _unwrap(read_checkpoint(path), Path(path))


class SourceStateDict(dict):
    """A source state dict in timm's names that remembers how it was converted from another library's layout
    (:class:`timm_anysize.origins.Conversion`, None for timm's own layout); the adaptation report reads it."""

    conversion: Any = None


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


def read_source_state_dict(path: Union[str, os.PathLike], plan: Any) -> StateDict:
    """Read the weights of a variant: in timm's layout as they are, another library's converted to timm's names.

    ``pretrained.layout`` (``auto``: detected from the keys) picks the layout and ``pretrained.select`` the model
    of a teacher/student checkpoint; a transformers ``config.json`` beside the weights is checked against the
    variant's source geometry and numerics.

    Args:
        path: Weight file, or a transformers ``save_pretrained`` folder.
        plan: The variant's :class:`~timm_anysize.plan.VariantPlan`.

    Returns:
        A :class:`SourceStateDict`; its ``conversion`` says where each tensor came from.

    Raises:
        WeightsError: Unreadable file; ambiguous or unknown layout; a layout of another family; numerics the
            variant's model_args do not match; a classifier that cannot be carried over into a kept head.
    """

    p = Path(path)
    src = plan.spec.pretrained
    obj = read_checkpoint(p)
    if src.layout == "timm":
        return SourceStateDict(_unwrap(obj, p))
    try:
        state_dict, wrappers = unwrap_checkpoint(obj, src.select, where=str(p))
    except WeightsError:
        if src.layout != "auto":
            raise
        return SourceStateDict(_unwrap(obj, p))  # not a foreign checkpoint either: timm's reader says why
    config = transformers_config(p)
    conversion = detect_layout(state_dict, src.layout, str(p), config)
    if conversion is None:
        return SourceStateDict(state_dict)
    conversion.wrappers = wrappers
    check_against_plan(conversion, plan, config, where=str(p))
    out = SourceStateDict(conversion.state_dict)
    out.conversion = conversion
    return out


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
    if not hasattr(model, "load_pretrained"):
        raise WeightsError(f"{p}: {type(model).__name__} cannot read .npz weights; convert them to safetensors")
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.fill_(math.nan)
    try:
        model.load_pretrained(str(p))
    except Exception as e:  # timm raises KeyError/ValueError/zipfile errors on foreign layouts
        raise WeightsError(
            f"{p}: not a JAX/big_vision checkpoint that {type(model).__name__}.load_pretrained can read "
            f"({type(e).__name__}: {e})"
        ) from e
    # A tensor the file did not set is still NaN everywhere; everything else came from the file.
    return {k: v for k, v in model.state_dict().items() if not (v.is_floating_point() and torch.isnan(v).all())}


def download_hub_weights(
    repo_id: str, filename: Optional[str] = None, revision: Optional[str] = None, cache_dir: Optional[str] = None
) -> Path:
    """Download (or find in the cache) a Hub weight file through ``huggingface_hub``.

    Honours ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT``; without ``filename`` tries ``model.safetensors`` then
    ``pytorch_model.bin`` as timm does.

    Raises:
        WeightsError: The repo or file cannot be reached and is not cached; says what to do.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    names = (filename,) if filename else HUB_FILENAMES
    last: Optional[Exception] = None
    for name in names:
        try:
            return Path(hf_hub_download(
                repo_id, name, revision=revision, cache_dir=cache_dir,
                library_name="timm-anysize", library_version=__version__,
            ))
        except EntryNotFoundError as e:
            last = e
        except LocalEntryNotFoundError as e:
            last = e
            break
        except (HfHubHTTPError, OSError, ValueError) as e:
            last = e
            break
    raise WeightsError(
        f"hf_hub_id {repo_id!r} (files tried: {', '.join(names)}): not downloadable and not in the cache "
        f"({type(last).__name__}: {str(last).splitlines()[0] if last else ''}); go online once to cache it, "
        f"or download the file and set pretrained.file"
    ) from last


def download_hub_config(
    repo_id: str, revision: Optional[str] = None, cache_dir: Optional[str] = None
) -> Optional[dict]:
    """The transformers ``config.json`` of a Hub repo (downloaded next to its weights in the cache), if it has one.

    Returns:
        The parsed config; None when the repo has no ``config.json``, has timm's (no ``model_type``), or cannot be
        reached (the weights' own download then says why).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=cache_dir,
                               library_name="timm-anysize", library_version=__version__)
    except (EntryNotFoundError, OSError, ValueError):  # not there, not cached, unreachable (HTTP errors are OSErrors)
        return None
    return transformers_config(path)


def download_url_weights(url: str) -> Path:
    """Download a weight URL into torch's hub cache (reused when present)."""
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(target), progress=True)
        except Exception as e:  # urllib raises URLError/HTTPError/OSError
            raise WeightsError(
                f"url {url}: download failed ({e}); download it yourself and set pretrained.file"
            ) from e
    return target
