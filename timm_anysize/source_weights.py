"""Reading a variant's source weights into timm's layout: fetched, read, converted from another library, checked.

The second step of loading a variant (:func:`timm_anysize.builder.build_variant`): the plan says where the weights
come from and what they are shaped for (with the transformers ``config.json`` that speaks for them, read once by
:func:`source_config` when the plan is made) and hands this step a :class:`SourceRead`, made from the plan by
:func:`timm_anysize.plan.source_read`. :func:`load_source_state_dict` fetches the file
(:mod:`timm_anysize.weight_downloads`), reads it by its format (:mod:`timm_anysize.weight_files`), maps another
library's layout onto timm's names (:func:`timm_anysize.origins.read_layout`) and checks the result against the
variant (:func:`timm_anysize.origins.check_conversion`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Optional, Union

import timm
import torch
import torch.nn as nn

from timm_anysize.core.errors import AnysizeError, WeightsError
from timm_anysize.core.family import CheckpointFilter
from timm_anysize.core.report import summarize_keys
from timm_anysize.core.spec import VariantSpec, WeightSource
from timm_anysize.origins import (
    Conversion,
    ConversionCheck,
    check_conversion,
    read_layout,
    reads_transformers_config,
)
from timm_anysize.weight_downloads import download_hub_config, download_hub_weights, download_url_weights
from timm_anysize.weight_files import detect_format, read_checkpoint, read_npz_state_dict, transformers_config

__all__ = [
    "SourceRead",
    "SourceStateDict",
    "load_source_state_dict",
    "read_source_state_dict",
    "refuse_non_finite",
    "source_config",
]

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SourceRead:
    """What to read for a variant and what to check it against, made from its plan
    (:func:`timm_anysize.plan.source_read`): the read never sees the plan itself."""

    pretrained: WeightSource  # the spec's pretrained section: layout, select, the Hub repo and revision it names
    base: str  # the timm architecture the weights are for
    source_kwargs: Mapping[str, Any] = field(repr=False)  # builds the base at the weights' geometry (.npz reads)
    source_shapes: Mapping[str, tuple[int, ...]] = field(repr=False)  # timm's layout at that geometry, by key
    held_keys: tuple[str, ...]  # geometry tensors timm's checkpoint filter must not touch (adaptation resamples them)
    checkpoint_filter: Optional[CheckpointFilter]  # timm's filter of the base's family, for foreign layouts
    source_model: Callable[[], nn.Module] = field(repr=False)  # the base at the weights' geometry, on meta
    check: ConversionCheck  # what another library's checkpoint must agree with


class SourceStateDict(dict):
    """A source state dict in timm's names that remembers how it was converted from another library's layout
    (:class:`timm_anysize.origins.Conversion`, None for timm's own layout); the adaptation report reads it."""

    conversion: Optional[Conversion] = None


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


def read_source_state_dict(path: Union[str, os.PathLike], request: SourceRead) -> SourceStateDict:
    """Read the weights of a variant: in timm's layout as they are, another library's converted to timm's names.

    ``pretrained.layout`` (``auto``: detected from the keys) picks the layout and ``pretrained.select`` the model
    of a teacher/student checkpoint; the transformers ``config.json`` that speaks for the weights
    (``request.check.config``, read once when the plan was made) is checked against the variant's source geometry
    and numerics.

    Args:
        path: Weight file, or a transformers ``save_pretrained`` folder.
        request: What to read and check, made from the variant's plan.

    Returns:
        A :class:`SourceStateDict`; its ``conversion`` says where each tensor came from.

    Raises:
        WeightsError: Unreadable file; ambiguous or unknown layout; a layout of another family; numerics the
            variant's model_args do not match; a classifier that cannot be carried over into a kept head.
    """
    p = Path(path)
    src, check = request.pretrained, request.check
    found = read_layout(read_checkpoint(p), src.layout, src.select, str(p), check.config)
    out = SourceStateDict(found.state_dict)
    if found.conversion is not None:
        check_conversion(found.conversion, check, where=str(p))
        out.conversion = found.conversion
    return out


def _read_file(request: SourceRead, path: Union[str, os.PathLike]) -> StateDict:
    """One weight file (or ``save_pretrained`` folder) in timm's names at the source geometry."""
    if detect_format(path) == "npz":

        def build() -> nn.Module:
            # Its random init is overwritten by the file: the caller's (seeded) random state is left untouched, so the
            # model built after the read initialises what the weights do not cover exactly as with any other format.
            with torch.random.fork_rng(devices=[]):
                return timm.create_model(request.base, pretrained=False, **request.source_kwargs)

        return read_npz_state_dict(path, build)
    state_dict = read_source_state_dict(path, request)  # other libraries' layouts come back in timm's names
    if request.checkpoint_filter is None:
        return state_dict
    if state_dict.keys() <= request.source_shapes.keys() or state_dict.conversion:
        return state_dict  # already timm's layout: nothing for the filter to rename
    # timm's filters take the model the weights are for (they read its shapes): one at the source geometry, on meta.
    source_model = request.source_model()
    # timm's filter renames foreign layouts, but it also resamples (guessing square grids) when a shape differs
    # from the model's; hold the geometry tensors aside so only adapt_state_dict changes them, from known sizes.
    held = {k: state_dict.pop(k) for k in request.held_keys if k in state_dict}
    try:
        return {**request.checkpoint_filter(state_dict, source_model), **held}
    except Exception as e:  # filters index keys and shapes freely; anything they raise means a foreign layout
        raise WeightsError(f"{path}: timm's {request.check.family} checkpoint filter cannot read it ({e!r})") from e


def load_source_state_dict(
    request: SourceRead, cfg: Mapping[str, Any], cache_dir: Optional[Union[str, os.PathLike]] = None
) -> tuple[StateDict, str]:
    """Fetch and read the source weights named by a resolved pretrained cfg: state_dict > file > Hub > url.

    Args:
        request: What to read and check (:func:`timm_anysize.plan.source_read` of the variant's plan, made for these
            weights).
        cfg: The resolved pretrained cfg's fields (``state_dict``, ``file``, ``hf_hub_id``, ``hf_hub_filename``,
            ``url``, and ``sha256`` where a URL's file hash is known).
        cache_dir: Cache folder for Hub and URL downloads.

    Returns:
        The state dict in timm's layout at the source geometry, and a description of where it came from.

    Raises:
        WeightsError: No source, or the weights cannot be fetched or read (the message names the file).

    Example:
        >>> import torch
        >>> from timm_anysize.plan import make_plan, source_read
        >>> from timm_anysize.core.spec import parse_variant
        >>> request = source_read(make_plan(parse_variant("v", {"base": "test_vit"})))
        >>> sd, where = load_source_state_dict(request, {"state_dict": {"cls_token": torch.zeros(1, 1, 64)}})
        >>> list(sd), where
        (['cls_token'], 'state_dict (in memory)')
    """
    src = request.pretrained
    if cfg.get("state_dict"):
        return dict(cfg["state_dict"]), "state_dict (in memory)"
    if cfg.get("file"):
        return _read_file(request, cfg["file"]), f"file {cfg['file']}"
    if cfg.get("hf_hub_id"):
        revision = src.revision if cfg["hf_hub_id"] == src.hf_hub_id else None
        path = download_hub_weights(
            cfg["hf_hub_id"], cfg.get("hf_hub_filename"), revision, str(cache_dir) if cache_dir else None
        )
        return _read_file(request, path), f"hf-hub {cfg['hf_hub_id']}" + (f"@{revision}" if revision else "")
    if cfg.get("url"):
        url = cfg["url"][0] if isinstance(cfg["url"], (tuple, list)) else cfg["url"]
        return _read_file(request, download_url_weights(url, cfg.get("sha256"), cache_dir)), f"url {url}"
    raise WeightsError(
        f"{request.check.variant}.pretrained: no weight source (base {request.base} has "
        f"none); set pretrained.file or pretrained.hf_hub_id, or create the model with pretrained=False"
    )


def refuse_non_finite(tensors: Mapping[str, torch.Tensor], where: str, bounds: Collection[str] = ()) -> None:
    """Refuse NaN or Inf weights: they only ever produce NaN outputs. An infinite tensor named in ``bounds`` (a
    buffer) is a bound, not a weight (Gemma 4's clipped linears keep +-inf limits when clipping is off): only NaN is
    refused there.

    Raises:
        WeightsError: Naming ``where`` and the tensors.

    Example:
        >>> import math, torch
        >>> refuse_non_finite({"clip_max": torch.tensor([math.inf])}, "w.pth", bounds={"clip_max"})
        >>> refuse_non_finite({"w": torch.tensor([math.nan])}, "w.pth")
        Traceback (most recent call last):
        ...
        timm_anysize.core.errors.WeightsError: w.pth: tensors with NaN or Inf values: w; timm-anysize refuses non-finite weights (they give NaN outputs): fix or re-export the checkpoint
    """

    def finite(v: torch.Tensor) -> bool:
        # NaN and Inf propagate through a sum, so one reduction clears a tensor; only a non-finite sum (which an
        # overflow could also cause) needs the exact element-wise check.
        return bool(torch.isfinite(v.sum(dtype=torch.float32))) or bool(torch.isfinite(v).all())

    bad = [
        k
        for k, v in tensors.items()
        if v.is_floating_point() and not finite(v) and (k not in bounds or bool(torch.isnan(v).any()))
    ]
    if bad:
        raise WeightsError(
            f"{where}: tensors with NaN or Inf values: {summarize_keys(bad)}; timm-anysize refuses "
            f"non-finite weights (they give NaN outputs): fix or re-export the checkpoint"
        )
