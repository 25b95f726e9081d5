"""Making a variant's plan: its spec resolved against timm -- the base architecture, the source geometry of the
weights and the target geometry of the model, all read off models built on the ``meta`` device (no memory, no weights
read) -- and the cache of the plans of specs without call-time overrides.

The first step of loading a variant (:func:`timm_anysize.builder.build_variant`): the
:class:`~timm_anysize.core.variant_plan.VariantPlan` is everything the later steps need -- the geometries, the kwargs
of both models, the layout of every geometry-dependent tensor, what the model costs, and the transformers
``config.json`` that speaks for the weights (read once here, by :func:`timm_anysize.source_weights.source_config`,
and carried on to the weights' read: :func:`source_read`). Reading geometry off timm lives in
:mod:`timm_anysize.timm_geometry`, the checks in :mod:`timm_anysize.validation`, the memory model in
:mod:`timm_anysize.core.memory`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Union

import torch.nn as nn

from timm_anysize.core.errors import SpecError
from timm_anysize.core.family import Family
from timm_anysize.core.memory import check_geometry_memory
from timm_anysize.core.meta import build_meta
from timm_anysize.core.spec import VariantSpec
from timm_anysize.core.variant_plan import VariantPlan
from timm_anysize.families import family_of, generic_family
from timm_anysize.origins import ConversionCheck, model_numerics
from timm_anysize.source_weights import SourceRead, source_config
from timm_anysize.timm_geometry import (
    file_geometry,
    geometry_of,
    resolve_base_cfg,
    target_feature_size,
    tensor_resamples,
    with_config_geometry,
    with_file_geometry,
)
from timm_anysize.validation import (
    check_patches_and_channels,
    check_requested,
    check_runs_at_own_size,
    check_target,
    refuse_geometry_bound,
)

__all__ = ["make_plan", "made_plan", "source_read"]


def _geometry_kwargs(img_size: Any, patch_size: Any, in_chans: Any, num_classes: Any) -> dict[str, Any]:
    if isinstance(patch_size, tuple) and patch_size[0] == patch_size[1]:
        patch_size = patch_size[0]  # some constructors (Twins) take an int only; every one takes an int
    given = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes)
    return {k: v for k, v in given.items() if v is not None}


_default_plans: dict[str, VariantPlan] = {}


def make_plan(
    spec: VariantSpec,
    overrides: Optional[dict[str, Any]] = None,
    weights: Optional[Mapping[str, Any]] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> VariantPlan:
    """Resolve a spec: base cfg, family, source and target geometry, and the ``config.json`` that speaks for the
    weights. Reads no weights, allocates no tensors.

    Weights that state their geometry in their safetensors metadata (a calibrated variant's, written by
    :func:`timm_anysize.calibration.save_calibrated`) are at that geometry, whatever the spec's ``pretrained``
    says (:func:`~timm_anysize.timm_geometry.with_file_geometry`): at the variant's own, every tensor is copied.

    Args:
        spec: The variant spec.
        overrides: ``timm.create_model`` kwargs that override the spec for this model (``img_size``,
            ``num_classes``, ``in_chans``, ...).
        weights: Where the weights will be read from (the resolved pretrained cfg's ``file`` / ``hf_hub_id`` /
            ``state_dict``... fields) when they will be (``pretrained=True``): the plan takes the transformers
            ``config.json`` of those (a Hub repo's is downloaded). None: only the one beside the spec's own file.
        cache_dir: Cache folder for a Hub download.

    Returns:
        The plan; the same object for the same spec and ``config.json`` when there are no overrides.

    Raises:
        SpecError: The base does not exist, its family is not supported, or the geometry is impossible.
        WeightsError: The ``config.json`` beside weights that will be read is not JSON.

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> plan = make_plan(parse_variant("v", {"base": "test_vit", "img_size": 64, "patch_size": 4}))
        >>> plan.source.grid_size, plan.target.grid_size
        ((10, 10), (16, 16))
    """
    geometry = file_geometry(spec, weights)
    # a file of a variant's own weights is in timm's layout: no config.json speaks for it
    config = None if geometry is not None else source_config(spec, weights, cache_dir)
    if not overrides:
        # The plan of a spec without overrides never changes; each create_model of a variant reuses it.
        key = _plan_key(spec, config, geometry)
        plan = _default_plans.get(key)
        if plan is None:
            plan = _default_plans[key] = _make_plan(spec, {}, config, geometry)
        return plan
    return _make_plan(spec, dict(overrides), config, geometry)


def source_read(plan: VariantPlan) -> SourceRead:
    """What the weights' read needs of a plan (:func:`timm_anysize.source_weights.load_source_state_dict`).

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> source_read(make_plan(parse_variant("v", {"base": "test_vit", "img_size": 64}))).check.img_size
        (160, 160)
    """
    spec, s = plan.spec, plan.source
    check = ConversionCheck(
        variant=spec.where,
        arch=spec.arch,
        family=plan.family.name,
        source_kwargs=plan.source_kwargs,
        target_kwargs=plan.target_kwargs,
        source_numerics=plan.source_numerics,
        img_size=s.img_size,
        patch_size=s.patch_size,
        in_chans=s.in_chans,
        num_classes=s.num_classes,
        target_num_classes=plan.target.num_classes,
        config=plan.config,
    )
    return SourceRead(
        pretrained=spec.pretrained,
        base=spec.base,
        source_kwargs=plan.source_kwargs,
        source_shapes=plan.source_shapes,
        held_keys=(*plan.resamples, *plan.patch_keys),
        checkpoint_filter=plan.family.checkpoint_filter,
        # the meta model the plan built at the weights' geometry, else (a plan made before it kept one) a new one
        source_model=lambda: plan.source_model or build_meta(spec, plan.source_kwargs, "source (pretrained)"),
        check=check,
    )


def made_plan(spec: VariantSpec) -> Optional[VariantPlan]:
    """``make_plan(spec)`` where it was made already (by a ``create_model`` without overrides whose weights bring no
    other ``config.json``), else None: nothing is built.

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> spec = parse_variant("doc_made_plan", {"base": "test_vit", "img_size": 48})
        >>> made_plan(spec) is None
        True
        >>> plan = make_plan(spec)
        >>> made_plan(spec) is plan
        True
    """
    geometry = file_geometry(spec)
    config = None if geometry is not None else source_config(spec)
    return _default_plans.get(_plan_key(spec, config, geometry))


def forget_plans(spec: VariantSpec) -> None:
    """Drop the cached plans of ``spec`` (every ``config.json`` it was made with): the variant was replaced or
    unregistered (:func:`timm_anysize.unregister`), so nothing keeps them alive.

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> spec = parse_variant("doc_forget_plans", {"base": "test_vit", "img_size": 48})
        >>> _ = make_plan(spec)
        >>> forget_plans(spec)
        >>> made_plan(spec) is None
        True
    """
    prefix = f"{spec.origin}|{spec.model_dump_json()}|"
    for key in [k for k in _default_plans if k.startswith(prefix)]:
        del _default_plans[key]


def _plan_key(spec: VariantSpec, config: Optional[dict[str, Any]], geometry: Optional[dict[str, Any]]) -> str:
    # The origin is excluded from dumps but named in errors; a config.json and a weight file's geometry are part of
    # what the plan was made from.
    made_from = json.dumps([config, geometry], sort_keys=True, default=str)
    return f"{spec.origin}|{spec.model_dump_json()}|{made_from}"


def _call_error(spec: VariantSpec, overrides: dict[str, Any], err: SpecError) -> Exception:
    """A constructor's TypeError caused by a create_model keyword (the spec alone was validated at registration)
    is the caller's error, a TypeError as for any timm model; anything else stays a SpecError."""
    cause = err.__cause__
    if overrides and isinstance(cause, TypeError):
        return TypeError(
            f"timm.create_model({spec.name!r}, ...): {cause} (keyword arguments given: {', '.join(sorted(overrides))})"
        )
    return err


def _make_plan(
    spec: VariantSpec,
    overrides: dict[str, Any],
    config: Optional[dict[str, Any]],
    geometry: Optional[dict[str, Any]] = None,
) -> VariantPlan:
    """The plan of ``spec`` with ``overrides``, its source geometry that of a weight file stating one
    (``geometry``), else its unset fields taken from ``config``: both models built on the meta device, every check
    of :mod:`timm_anysize.validation` made in order."""
    spec = with_config_geometry(with_file_geometry(spec, geometry), config)
    base_cfg = resolve_base_cfg(spec)
    src = spec.pretrained
    source_kwargs = {
        **spec.model_args,
        **src.model_args,
        **_geometry_kwargs(src.img_size, src.patch_size, src.in_chans, src.num_classes),
    }
    target_kwargs = {
        **spec.model_args,
        **_geometry_kwargs(spec.img_size, spec.patch_size, spec.in_chans, spec.num_classes),
        **overrides,
    }
    source_img, target_img = source_kwargs.get("img_size"), target_kwargs.get("img_size")
    source_model, source_kwargs = _build_sized(spec, source_kwargs, "source (pretrained)")
    # An architecture without a row is adapted generically: same-shape tensors copied, first layer and classifier
    # adapted, and any other tensor whose shape the geometry changes refused by name below.
    family = family_of(source_model) or generic_family(source_model, base_cfg)
    source = geometry_of(source_model, family, base_cfg, source_img)
    if target_img is None and source_img is not None and "img_larger" in family.unsupported:
        # A family bound to one input size takes the weights' size when the spec names none.
        target_img = source_img
        target_kwargs = {**target_kwargs, "img_size": source_img}
    check_requested(spec, family, source, source_model, target_kwargs)
    try:
        target_model, target_kwargs = _build_sized(spec, target_kwargs, "target", family)
    except SpecError as e:
        raise _call_error(spec, overrides, e) from e.__cause__
    target = geometry_of(target_model, family, base_cfg, target_img)
    dynamic = family.supports_dynamic if spec.dynamic is None else spec.dynamic
    check_target(spec, family, source, target, target_model, dynamic)
    for model, geo, key in ((source_model, source, "pretrained.img_size"), (target_model, target, "img_size")):
        cost = check_geometry_memory(spec, model, geo, key, family)  # the target's, last, is the plan's
    check_patches_and_channels(spec, source, target)
    check_runs_at_own_size(spec, family, (source_model, source), (target_model, target), target_kwargs, dynamic)
    plan = VariantPlan(
        spec=spec,
        family=family,
        base_cfg=base_cfg,
        source=source,
        target=target,
        source_kwargs=source_kwargs,
        target_kwargs=target_kwargs,
        dynamic=dynamic,
        source_shapes={k: tuple(v.shape) for k, v in source_model.state_dict().items()},
        resamples=tensor_resamples(family, source_model, target_model),
        feature_size=target_feature_size(spec, base_cfg, target_model, target),
        config=config,
        source_numerics=model_numerics(source_model),
        cost=cost,
        source_model=source_model,
    )
    if family.generic:
        refuse_geometry_bound(plan, {k: tuple(v.shape) for k, v in target_model.state_dict().items()})
    return plan


def _build_sized(
    spec: VariantSpec, kwargs: dict[str, Any], what: str, family: Optional[Family] = None
) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`build_meta`, and the kwargs it was built with: constructors without an ``img_size`` argument (most
    CNNs, which take any size) are built without it; the size stays the variant's (its data cfg, its report)."""
    try:
        return build_meta(spec, kwargs, what, family), kwargs
    except SpecError as e:
        cause = e.__cause__
        if "img_size" not in kwargs or not isinstance(cause, TypeError) or "img_size" not in str(cause):
            raise
    kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
    return build_meta(spec, kwargs, what, family), kwargs
