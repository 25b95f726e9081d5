"""Reading geometry off timm: the base's pretrained cfg, the geometry a model was built for, the layout of every
geometry-dependent tensor between two models, and what a spec asks for before any model is built.

Every model here is built on the ``meta`` device (no memory, no weights read) by :mod:`timm_anysize.plan`, which
puts what these functions read into a :class:`~timm_anysize.core.variant_plan.VariantPlan`. :func:`spec_target` is
what the spec asks for without building anything: what a variant registers before its plan is made (``import
timm_anysize`` builds no model).
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import json
import math
import os
from typing import Any, Mapping, Optional, Union

import timm
import torch
import torch.nn as nn
from timm.layers import get_spatial_dim
from timm.models import get_pretrained_cfg, model_entrypoint

from timm_anysize.core.errors import SpecError, WeightsError
from timm_anysize.core.family import Family, tensor_layouts
from timm_anysize.core.geometry import Geometry, TensorResample
from timm_anysize.core.safetensors_io import read_metadata
from timm_anysize.core.spec import Size2, VariantSpec
from timm_anysize.families import FAMILIES
from timm_anysize.origins import config_geometry

__all__ = [
    "geometry_of",
    "resolve_base_cfg",
    "patch_from_model",
    "spec_target",
    "with_config_geometry",
    "GEOMETRY_METADATA",
    "file_geometry",
    "with_file_geometry",
    "tensor_resamples",
    "feature_size",
    "target_feature_size",
]


def _img_size(model: nn.Module, family: Family, base_cfg: dict[str, Any], given: Any = None) -> Size2:
    """The input size a model was built for: the one it was given, its patch embedding's, the model's own, else its
    pretrained cfg's (several families keep no record of it)."""
    pe = family.patch_embed(model)
    candidates = (
        given,
        getattr(pe, "img_size", None),
        getattr(model, "img_size", None),
        base_cfg.get("input_size", (0,))[1:],
    )
    for size in candidates:
        if isinstance(size, int):
            return (size, size)
        if size is not None and len(size) != 0:
            return (int(size[0]), int(size[1]))
    raise SpecError(f"cannot tell the input size of {type(model).__name__}; set img_size")


def geometry_of(
    model: nn.Module, family: Family, base_cfg: Optional[dict[str, Any]] = None, img_size: Any = None
) -> Geometry:
    """Read the geometry off a built model (works on the meta device).

    Example:
        >>> import timm
        >>> from timm_anysize.families import family_of
        >>> m = timm.create_model("test_vit", img_size=(32, 48))
        >>> geometry_of(m, family_of(m)).grid_size
        (2, 3)
    """
    return Geometry(
        img_size=_img_size(model, family, base_cfg or {}, img_size),
        patch_size=family.patch_size(model),
        grid_size=family.grid_size(model),
        in_chans=int(getattr(model, "in_chans", 3)),
        num_classes=int(getattr(model, "num_classes", 0)),
        num_prefix_tokens=family.num_prefix_tokens(model),
    )


def resolve_base_cfg(spec: VariantSpec) -> dict[str, Any]:
    """The pretrained cfg of the spec's base (``arch[.tag]``), checking the arch and tag exist in timm (no model built).

    Raises:
        SpecError: timm has no such architecture or tag; the message lists close names or the tags there are.

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> resolve_base_cfg(parse_variant("v", {"base": "vit_tiny_patch16_224.augreg_in21k_ft_in1k"}))["input_size"]
        (3, 224, 224)
    """
    if not timm.is_model(spec.arch):
        close = difflib.get_close_matches(spec.arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise SpecError(f"{spec.where}.base: unknown timm model {spec.arch!r}{hint} (see timm.list_models())")
    try:
        cfg = get_pretrained_cfg(spec.base)
    except RuntimeError:  # timm raises for an unknown tag
        cfg = None
    if cfg is None and spec.base_tag:
        tags = timm.list_pretrained(f"{spec.arch}.*")
        raise SpecError(
            f"{spec.where}.base: timm has no pretrained tag {spec.base_tag!r} for {spec.arch}; "
            f"available: {', '.join(tags) or 'none'}"
        )
    return cfg.to_dict() if cfg is not None else {}


def _rows_of_arch(arch: str) -> Optional[tuple[Family, ...]]:
    """The family rows of the class timm's entrypoint for ``arch`` is annotated to return (most are:
    ``-> VisionTransformer``), found without building it: () for a class no row claims (the generic path), None when
    the entrypoint names no class."""
    try:
        returns = model_entrypoint(arch).__annotations__.get("return")
    except (RuntimeError, AttributeError):
        return None
    if not isinstance(returns, type) or not issubclass(returns, nn.Module):
        return None
    return tuple(row for row in FAMILIES if returns in row.classes)


def patch_from_model(spec: VariantSpec) -> bool:
    """Whether the variant's patch size is only known once its model is built: the spec leaves it to the base, and
    the base's family embeds patches (or its entrypoint names no class to tell).

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> patch_from_model(parse_variant("v", {"base": "vit_tiny_patch16_224"}))
        True
        >>> patch_from_model(parse_variant("v", {"base": "convnext_atto"}))
        False
    """
    if spec.patch_size is not None:
        return False
    rows = _rows_of_arch(spec.arch)
    return rows is None or any(row.patch_embeds for row in rows)


def spec_target(spec: VariantSpec, base_cfg: Mapping[str, Any]) -> tuple[Geometry, bool]:
    """The target geometry and the dynamic choice a spec asks for, from its own fields and the base's pretrained cfg
    alone (no model built): what a variant registers until its plan is made.

    What the spec leaves unset is the base cfg's (input size, channels, classes), as timm's builder passes them to
    the constructor; the patch size the spec does not set, the grid and the prefix tokens need the model (None, None,
    0). ``dynamic`` left unset is what the family of the class the base's entrypoint returns supports (read off its
    annotation; the generic path: what the base cfg's ``fixed_input_size`` says; dynamic when it names no class).

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> spec = parse_variant("v", {"base": "vit_tiny_patch16_224", "img_size": 64, "in_chans": 1})
        >>> target, dynamic = spec_target(spec, resolve_base_cfg(spec))
        >>> target.img_size, target.in_chans, target.num_classes, dynamic
        ((64, 64), 1, 1000, True)
    """
    in_chans, *size = base_cfg.get("input_size") or (3, 224, 224)
    rows = _rows_of_arch(spec.arch)
    img = spec.img_size
    if img is None and spec.pretrained.img_size is not None and any("img_larger" in r.unsupported for r in rows or ()):
        img = spec.pretrained.img_size  # a family bound to one input size takes the weights' size (as _make_plan)
    if rows:
        choices = {r.supports_dynamic for r in rows}
        default = choices.pop() if len(choices) == 1 else True
    else:
        default = True if rows is None else not base_cfg.get("fixed_input_size", False)
    target = Geometry(
        img_size=tuple(img) if img is not None else (int(size[0]), int(size[1])),  # type: ignore[arg-type]
        patch_size=spec.patch_size,
        grid_size=None,
        in_chans=spec.in_chans if spec.in_chans is not None else int(in_chans),
        num_classes=spec.num_classes if spec.num_classes is not None else int(base_cfg.get("num_classes", 1000)),
        num_prefix_tokens=0,
    )
    return target, default if spec.dynamic is None else spec.dynamic


def tensor_resamples(family: Family, source_model: nn.Module, target_model: nn.Module) -> dict[str, TensorResample]:
    """The layout of every geometry-dependent tensor in both models: grids and windows read off the modules.

    Example:
        >>> import timm
        >>> from timm_anysize.families import family_of
        >>> source, target = timm.create_model("test_vit"), timm.create_model("test_vit", img_size=64)
        >>> tensor_resamples(family_of(source), source, target)
        {'pos_embed': TensorResample(kind='pos_tokens', source=(10, 10), target=(4, 4), prefix=1)}
    """
    out = {}
    target_sd = target_model.state_dict()
    source_sd = source_model.state_dict()
    token_patterns = [p for p, kind in family.tensors if kind == "pos_tokens"]
    for key, kind in tensor_layouts(family, target_sd).items():
        if key not in source_sd:
            continue
        owner = key.rsplit(".", 1)[0] if "." in key else ""
        if kind == "pos_tokens":
            index = next(i for i, p in enumerate(token_patterns) if fnmatch.fnmatchcase(key, p))
            src, tgt = family.token_grid(source_model, index), family.token_grid(target_model, index)
            out[key] = TensorResample(kind, src, tgt, family.pos_embed_prefix_tokens(source_model))
            continue
        if kind in ("pos_nchw", "pos_nhwc", "rel_axis"):
            dims = {"pos_nchw": slice(2, 4), "pos_nhwc": slice(1, 3), "rel_axis": slice(0, 1)}[kind]
            src, tgt = tuple(source_sd[key].shape[dims]), tuple(target_sd[key].shape[dims])
        elif kind == "pos_blocks":  # square blocks of a square grid (NesT builds square only)
            src, tgt = ((math.isqrt(sd[key].shape[1] * sd[key].shape[2]),) * 2 for sd in (source_sd, target_sd))
        else:
            attr = "window_size" if kind == "rel_table" else "resolution"
            src = tuple(getattr(source_model.get_submodule(owner), attr))
            tgt = tuple(getattr(target_model.get_submodule(owner), attr))
        out[key] = TensorResample(kind, src, tgt)  # type: ignore[arg-type]
    return out


def feature_size(model: nn.Module, geometry: Geometry) -> Size2:
    """The H x W of ``forward_features`` at the geometry's size: a forward on the meta device (shapes only).

    Example:
        >>> import timm
        >>> from timm_anysize.families import family_of
        >>> m = timm.create_model("swin_tiny_patch4_window7_224", img_size=(64, 96), window_size=4)
        >>> feature_size(m, geometry_of(m, family_of(m)))
        (2, 3)
    """
    x = torch.empty(1, geometry.in_chans, *geometry.img_size, device="meta")
    # In eval mode: BatchNorm in training mode refuses a 1 x 1 map of one image (ResNeSt, RexNet, SKNet...). A model
    # with real weights is probed through a meta copy, never moved.
    probe = model if all(p.is_meta for p in model.parameters()) else copy.deepcopy(model).to("meta")
    was_training = probe.training
    try:
        with torch.no_grad():
            out = probe.eval().forward_features(x)  # type: ignore[operator]  # torch: Module attrs typed Tensor|Module
    finally:
        probe.train(was_training)
    h, w = get_spatial_dim(getattr(model, "output_fmt", "NCHW"))
    return (int(out.shape[h]), int(out.shape[w]))


def with_config_geometry(spec: VariantSpec, config: Optional[dict[str, Any]]) -> VariantSpec:
    """``spec`` with the source geometry a transformers ``config.json`` states (``image_size``, ``patch_size``,
    ``num_channels``) filled into the ``pretrained`` fields the spec leaves unset; fields it sets are kept (and
    checked against the config when the weights are read).

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> spec = parse_variant("v", {"base": "test_vit", "img_size": 64})
        >>> with_config_geometry(spec, {"model_type": "vit", "image_size": 32, "patch_size": 8}).pretrained.img_size
        (32, 32)
    """

    src = spec.pretrained
    fill = {k: v for k, v in config_geometry(config).items() if getattr(src, k) is None}
    if not fill:
        return spec
    return spec.model_copy(update={"pretrained": src.model_copy(update=fill)})


# The safetensors metadata key in which a file of a variant's weights (timm_anysize.calibration.save_calibrated)
# states the geometry they are at: img_size, patch_size (where the model has one), in_chans, num_classes.
GEOMETRY_METADATA = "timm_anysize.geometry"


def file_geometry(spec: VariantSpec, weights: Optional[Mapping[str, Any]] = None) -> Optional[dict[str, Any]]:
    """The geometry a weight file states in its safetensors metadata (:data:`GEOMETRY_METADATA`, written with a
    calibrated variant's weights), read from its header alone.

    Args:
        spec: The variant.
        weights: The weight-location fields of the resolved pretrained cfg when the weights will be read (a
            ``pretrained_cfg_overlay`` file among them); None: the spec's own ``pretrained.file``.

    Returns:
        ``img_size``, ``patch_size`` (None where the file's model has none), ``in_chans`` and ``num_classes``, or
        None: not a local safetensors file, or no geometry in its metadata.

    Raises:
        WeightsError: The metadata's geometry is not one (names the file and the fix).

    Example:
        >>> import json, tempfile, torch
        >>> from safetensors.torch import save_file
        >>> from timm_anysize.core.spec import parse_variant
        >>> p = tempfile.mkdtemp() + "/w.safetensors"
        >>> geometry = {"img_size": [48, 48], "patch_size": [8, 8], "in_chans": 1, "num_classes": 10}
        >>> save_file({"a": torch.zeros(1)}, p, metadata={GEOMETRY_METADATA: json.dumps(geometry)})
        >>> file_geometry(parse_variant("v", {"base": "test_vit", "pretrained": {"file": p}}))
        {'img_size': (48, 48), 'patch_size': (8, 8), 'in_chans': 1, 'num_classes': 10}
    """
    path: Optional[Union[str, os.PathLike]]
    if weights is None:
        path = spec.pretrained.file
    else:
        path = None if weights.get("state_dict") else weights.get("file")
    if path is None or not str(path).endswith(".safetensors"):
        return None
    raw = read_metadata(path).get(GEOMETRY_METADATA)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        patch = data.get("patch_size")
        return {
            "img_size": (int(data["img_size"][0]), int(data["img_size"][1])),
            "patch_size": None if patch is None else (int(patch[0]), int(patch[1])),
            "in_chans": int(data["in_chans"]),
            "num_classes": int(data["num_classes"]),
        }
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise WeightsError(
            f"{path}: its metadata's {GEOMETRY_METADATA} is not a geometry ({raw!r}: {e!r}); re-save the weights "
            f"with timm_anysize's save_calibrated or remove the key"
        ) from e


def with_file_geometry(spec: VariantSpec, geometry: Optional[Mapping[str, Any]]) -> VariantSpec:
    """``spec`` reading weights that are at ``geometry`` (:func:`file_geometry`): its ``pretrained`` geometry
    replaced by the file's (the spec's describes the weights it was made from), in timm's layout, built with the
    variant's own ``model_args`` (the file was saved from the variant's model): a file at the variant's own
    geometry loads with every tensor copied.

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> spec = parse_variant("v", {"base": "test_vit", "img_size": 48, "pretrained": {"img_size": 32}})
        >>> g = {"img_size": (48, 48), "patch_size": (16, 16), "in_chans": 3, "num_classes": 1000}
        >>> src = with_file_geometry(spec, g).pretrained
        >>> src.img_size, src.patch_size, src.layout
        ((48, 48), (16, 16), 'timm')
    """
    if geometry is None:
        return spec
    update = {**geometry, "model_args": {}, "layout": "timm"}
    return spec.model_copy(update={"pretrained": spec.pretrained.model_copy(update=update)})


def target_feature_size(
    spec: VariantSpec, base_cfg: Mapping[str, Any], model: nn.Module, geometry: Geometry
) -> Optional[Size2]:
    """The variant's pool_size, where the base's cfg has one (spatial feature maps: the Swin families): the H x W of
    ``forward_features`` at the target geometry (:func:`feature_size`); None where the cfg has none.

    Raises:
        SpecError: The base's own forward cannot take the target's size.

    Example:
        >>> import timm
        >>> from timm_anysize.core.spec import parse_variant
        >>> from timm_anysize.families import family_of
        >>> spec = parse_variant("v", {"base": "test_vit"})
        >>> m = timm.create_model("test_vit")
        >>> target_feature_size(spec, resolve_base_cfg(spec), m, geometry_of(m, family_of(m))) is None
        True
    """
    if not base_cfg.get("pool_size"):
        return None
    try:
        return feature_size(model, geometry)
    except Exception as e:  # the base's own forward cannot take the size
        raise SpecError(
            f"{spec.where}.img_size: {spec.arch} cannot run at {list(geometry.img_size)} ({e}); pick another img_size"
        ) from e
