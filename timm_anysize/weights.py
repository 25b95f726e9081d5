"""Reading source weights: local files by their real format, Hub repos and URLs through their caches.

The second step of loading a variant (:func:`timm_anysize.builder.build_variant`): the plan says where the weights
come from and what they are shaped for (with the transformers ``config.json`` that speaks for them, read once by
:func:`source_config` when the plan is made); :func:`load_source_state_dict` fetches and reads them, maps another
library's layout onto timm's names (:mod:`timm_anysize.origins`) and checks the checkpoint against the plan.

The format comes from the file (suffix, then content), never from a pretrained cfg's ``custom_load`` flag.
Pickles are only read with ``torch.load(weights_only=True)``; safetensors is preferred everywhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import timm
import torch
import torch.nn as nn

from timm_anysize.core.errors import AnysizeError, WeightsError
from timm_anysize.core.meta import build_meta
from timm_anysize.core.spec import VariantSpec
from timm_anysize.core.version import __version__
from timm_anysize.origins import check_against_plan, detect_layout, reads_transformers_config, unwrap_checkpoint

__all__ = [
    "detect_format",
    "read_state_dict",
    "read_checkpoint",
    "read_source_state_dict",
    "load_source_state_dict",
    "source_config",
    "transformers_config",
    "SourceStateDict",
    "read_npz_state_dict",
    "download_hub_weights",
    "download_url_weights",
]

_logger = logging.getLogger(__name__)
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
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


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
        import safetensors.torch

        try:
            return dict(safetensors.torch.load_file(str(p), device="cpu"))
        except Exception as e:  # safetensors raises its own SafetensorError, OSError or RuntimeError
            raise WeightsError(f"{p}: not a readable safetensors file ({e}); re-save it or check the download") from e
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


def source_config(
    spec: VariantSpec, weights: Optional[Mapping[str, Any]] = None, cache_dir: Optional[Union[str, os.PathLike]] = None
) -> Optional[dict]:
    """The transformers ``config.json`` that speaks for a variant's weights, read once (the plan carries it on).

    Only where ``pretrained.layout`` lets one speak for the weights (``auto`` or a transformers layout): the file
    beside a local weight file or in a ``save_pretrained`` folder, or the one of the Hub repo the variant names as
    its own weight source (downloaded next to the weights in the Hub cache).

    Args:
        spec: The variant.
        weights: The weight-location fields of the resolved pretrained cfg (``state_dict`` / ``file`` /
            ``hf_hub_id``...) when the weights will be read (``pretrained=True``); None: the spec's own local file
            only, nothing downloaded, and an unreadable ``config.json`` is left for the weights' read to report.

    Returns:
        The parsed config, or None.

    Raises:
        WeightsError: The ``config.json`` beside weights that will be read is not JSON; names it.

    Example:
        >>> import json, tempfile, pathlib
        >>> from timm_anysize.core.spec import parse_variant
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "config.json").write_text(json.dumps({"model_type": "vit", "image_size": 40}))
        >>> spec = parse_variant("v", {"base": "test_vit", "pretrained": {"file": str(d / "model.safetensors")}})
        >>> source_config(spec)["image_size"]
        40
    """
    src = spec.pretrained
    if not reads_transformers_config(src.layout):
        return None
    if weights is None:
        if src.file is None:
            return None
        try:
            return transformers_config(src.file)
        except AnysizeError:
            return None  # reported, naming the file, when the weights are read
    if weights.get("state_dict"):
        return None
    if weights.get("file"):
        return transformers_config(weights["file"])
    if src.hf_hub_id is not None and weights.get("hf_hub_id") == src.hf_hub_id:
        return download_hub_config(src.hf_hub_id, src.revision, str(cache_dir) if cache_dir else None)
    return None  # a base tag's weights (timm's own layout), or another source named at create_model


def read_source_state_dict(path: Union[str, os.PathLike], plan: Any) -> StateDict:
    """Read the weights of a variant: in timm's layout as they are, another library's converted to timm's names.

    ``pretrained.layout`` (``auto``: detected from the keys) picks the layout and ``pretrained.select`` the model
    of a teacher/student checkpoint; the transformers ``config.json`` the plan carries (``plan.config``, read once
    when the plan was made) is checked against the variant's source geometry and numerics.

    Args:
        path: Weight file, or a transformers ``save_pretrained`` folder.
        plan: The variant's :class:`~timm_anysize.core.variant_plan.VariantPlan`.

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
    config = plan.config
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
            return Path(
                hf_hub_download(
                    repo_id,
                    name,
                    revision=revision,
                    cache_dir=cache_dir,
                    library_name="timm-anysize",
                    library_version=__version__,
                )
            )
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
        path = hf_hub_download(
            repo_id,
            "config.json",
            revision=revision,
            cache_dir=cache_dir,
            library_name="timm-anysize",
            library_version=__version__,
        )
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
            raise WeightsError(f"url {url}: download failed ({e}); download it yourself and set pretrained.file") from e
    return target


def _read_file(plan: Any, path: Union[str, os.PathLike]) -> StateDict:
    """One weight file (or ``save_pretrained`` folder) in timm's names at the source geometry."""
    if detect_format(path) == "npz":

        def build() -> nn.Module:
            # Its random init is overwritten by the file: the caller's (seeded) random state is left untouched, so the
            # model built after the read initialises what the weights do not cover exactly as with any other format.
            with torch.random.fork_rng(devices=[]):
                return timm.create_model(plan.spec.base, pretrained=False, **plan.source_kwargs)

        return read_npz_state_dict(path, build)
    state_dict = read_source_state_dict(path, plan)  # other libraries' layouts come back in timm's names
    if plan.family.checkpoint_filter is None:
        return state_dict
    if state_dict.keys() <= plan.source_shapes.keys() or getattr(state_dict, "conversion", None):
        return state_dict  # already timm's layout: nothing for the filter to rename
    # timm's filters take the model the weights are for (they read its shapes): one at the source geometry, on meta.
    source_model = build_meta(plan.spec, plan.source_kwargs, "source (pretrained)")
    # timm's filter renames foreign layouts, but it also resamples (guessing square grids) when a shape differs
    # from the model's; hold the geometry tensors aside so only adapt_state_dict changes them, from known sizes.
    held = {k: state_dict.pop(k) for k in (*plan.resamples, *plan.patch_keys) if k in state_dict}
    try:
        return {**plan.family.checkpoint_filter(state_dict, source_model), **held}
    except Exception as e:  # filters index keys and shapes freely; anything they raise means a foreign layout
        raise WeightsError(f"{path}: timm's {plan.family.name} checkpoint filter cannot read it ({e!r})") from e


def load_source_state_dict(
    plan: Any, cfg: Mapping[str, Any], cache_dir: Optional[Union[str, os.PathLike]] = None
) -> tuple[StateDict, str]:
    """Fetch and read the source weights named by a resolved pretrained cfg: state_dict > file > Hub > url.

    Args:
        plan: The variant's :class:`~timm_anysize.core.variant_plan.VariantPlan`, made for these weights (its ``config``).
        cfg: The resolved pretrained cfg's fields (``state_dict``, ``file``, ``hf_hub_id``, ``hf_hub_filename``,
            ``url``).
        cache_dir: Cache folder for Hub and URL downloads.

    Returns:
        The state dict in timm's layout at the source geometry, and a description of where it came from.

    Raises:
        WeightsError: No source, or the weights cannot be fetched or read (the message names the file).

    Example:
        >>> import torch
        >>> from timm_anysize.plan import make_plan
        >>> from timm_anysize.core.spec import parse_variant
        >>> plan = make_plan(parse_variant("v", {"base": "test_vit"}))
        >>> sd, where = load_source_state_dict(plan, {"state_dict": {"cls_token": torch.zeros(1, 1, 64)}})
        >>> list(sd), where
        (['cls_token'], 'state_dict (in memory)')
    """
    if cfg.get("state_dict"):
        return dict(cfg["state_dict"]), "state_dict (in memory)"
    if cfg.get("file"):
        return _read_file(plan, cfg["file"]), f"file {cfg['file']}"
    if cfg.get("hf_hub_id"):
        revision = plan.spec.pretrained.revision if cfg["hf_hub_id"] == plan.spec.pretrained.hf_hub_id else None
        path = download_hub_weights(
            cfg["hf_hub_id"], cfg.get("hf_hub_filename"), revision, str(cache_dir) if cache_dir else None
        )
        return _read_file(plan, path), f"hf-hub {cfg['hf_hub_id']}" + (f"@{revision}" if revision else "")
    if cfg.get("url"):
        url = cfg["url"][0] if isinstance(cfg["url"], (tuple, list)) else cfg["url"]
        return _read_file(plan, download_url_weights(url)), f"url {url}"
    raise WeightsError(
        f"{plan.spec.where}.pretrained: no weight source (base {plan.spec.base} has "
        f"none); set pretrained.file or pretrained.hf_hub_id, or create the model with pretrained=False"
    )
