"""Building a variant: the model at its geometry, its pretrained cfg, and its adapted weights.

This is what a registered entrypoint runs when ``timm.create_model(variant_name, ...)`` is called. It reads as one
pass, each step taking what the previous one returned: the spec is planned (:mod:`timm_anysize.plan`: geometry and
weight source resolved, a transformers ``config.json`` read once), the weights are read and mapped to timm's names
from their origin (:mod:`timm_anysize.source_weights`), the model is built, the weights adapted to it
(:mod:`timm_anysize.adapt`) and loaded, and the run-time features switched on (dynamic sizes, flexi patches, the
feature wrapper).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from timm.models import FeatureGraphNet, resolve_pretrained_cfg

from timm_anysize.adapt import adapt_state_dict
from timm_anysize.core.errors import WeightsError
from timm_anysize.core.family import Family
from timm_anysize.core.meta import initialize_fresh, parameters_uninitialised
from timm_anysize.core.report import AdaptationReport
from timm_anysize.core.safetensors_io import owned_aligned
from timm_anysize.core.spec import VariantSpec
from timm_anysize.dynamic import enable_dynamic, guard_run_time_size
from timm_anysize.flexi import apply_flexi
from timm_anysize.plan import (
    Geometry,
    VariantPlan,
    check_build_memory,
    make_plan,
    patch_from_model,
    resolve_base_cfg,
    source_read,
    spec_target,
)
from timm_anysize.source_weights import load_source_state_dict, refuse_non_finite

__all__ = ["build_variant", "variant_pretrained_cfg", "spec_pretrained_cfg", "stats_for_channels", "default_tag"]

_logger = logging.getLogger(__name__)
_WEIGHT_FIELDS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source")
# Fields of the base cfg that describe the base geometry; a variant states its own or none.
_BASE_GEOMETRY_FIELDS = ("test_input_size", "min_input_size", "pool_size", "test_pool_size", "test_crop_pct")


def default_tag(spec: VariantSpec) -> str:
    """The pretrained tag a variant registers: ``pretrained.tag``, else the base's tag, else ``anysize``.

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> default_tag(parse_variant("v", {"base": "vit_tiny_patch16_224.augreg_in21k_ft_in1k"}))
        'augreg_in21k_ft_in1k'
    """
    return spec.pretrained.tag or spec.base_tag or "anysize"


def stats_for_channels(values: Sequence[float], in_chans: int) -> tuple[float, ...]:
    """Per-channel mean/std for ``in_chans`` channels from RGB (or any-length) stats.

    One channel gets the average (the gray value of an image whose channels were equal); more channels repeat the
    stats cyclically, as ``adapt_input_conv`` repeats the kernel's channels.

    Example:
        >>> stats_for_channels((0.2, 0.4, 0.6), 1)
        (0.4,)
        >>> stats_for_channels((0.5,), 3)
        (0.5, 0.5, 0.5)
    """
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if in_chans == 1:
        return (round(sum(values) / len(values), 6),)
    return tuple(values[i % len(values)] for i in range(in_chans))


def _weight_location(spec: VariantSpec, base_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Weight-source fields of the variant's registered cfg: the spec's own, else the base tag's."""
    src = spec.pretrained
    if src.file is not None:
        return {"file": str(src.file)}
    if src.hf_hub_id is not None:
        return {"hf_hub_id": src.hf_hub_id, "hf_hub_filename": src.filename}
    if src.url is not None:
        return {"url": src.url}
    return {k: base_cfg.get(k) for k in ("url", "file", "hf_hub_id", "hf_hub_filename")}


def variant_pretrained_cfg(plan: VariantPlan, weights: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The pretrained cfg of a variant: the base's, rewritten for the target geometry and the variant's weights.

    It describes the *variant* (input size ``(in_chans, H, W)``, mean/std with ``in_chans`` entries, classes) so
    `timm.data.resolve_data_config` gives the right transforms. ``custom_load`` is always False: the weight
    format is read from the file, not inherited from the base tag.

    Args:
        plan: The resolved plan.
        weights: Weight-location fields to use instead of the spec's (e.g. a resolved ``file`` overlay).

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> cfg = variant_pretrained_cfg(make_plan(parse_variant("v", {"base": "test_vit", "in_chans": 1})))
        >>> cfg["input_size"], cfg["mean"], cfg["fixed_input_size"]
        ((1, 160, 160), (0.5,), False)
    """
    return _variant_cfg(plan.spec, plan.base_cfg, plan.target, plan.dynamic, plan.feature_size, weights)


def spec_pretrained_cfg(spec: VariantSpec, base_cfg: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The pretrained cfg a variant registers before its plan is made: :func:`variant_pretrained_cfg`'s fields from
    the spec and the base's pretrained cfg alone (:func:`timm_anysize.plan.spec_target`), no model built.

    What only a built model tells -- ``pool_size`` (a forward at the variant's size), ``test_input_size`` and
    ``min_input_size`` (whole patches) when the spec leaves the patch to the base, the grid in the description,
    defaults of the base's constructor the spec does not restate -- is filled in when the plan is made.

    Raises:
        SpecError: timm has no such base architecture or tag.

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> cfg = spec_pretrained_cfg(parse_variant("v", {"base": "test_vit", "img_size": 64, "in_chans": 1}))
        >>> cfg["input_size"], cfg["mean"], cfg["fixed_input_size"]
        ((1, 64, 64), (0.5,), False)
    """
    base_cfg = resolve_base_cfg(spec) if base_cfg is None else base_cfg
    target, dynamic = spec_target(spec, base_cfg)
    cfg = _variant_cfg(spec, base_cfg, target, dynamic, None, None)
    if patch_from_model(spec):  # scaled sizes are whole patches: the base's patch is known once the model is
        for key in ("test_input_size", "min_input_size", "test_crop_pct"):
            cfg.pop(key, None)
    return cfg


def _variant_cfg(
    spec: VariantSpec,
    base: Mapping[str, Any],
    t: Geometry,
    dynamic: bool,
    feature_size: Optional[tuple[int, int]],
    weights: Optional[dict[str, Any]],
) -> dict[str, Any]:
    data = spec.data
    same_classes = t.num_classes == base.get("num_classes", t.num_classes)
    cfg = {k: v for k, v in base.items() if k not in _WEIGHT_FIELDS + _BASE_GEOMETRY_FIELDS}
    cfg.update(_geometry_fields(base, t, feature_size))
    cfg.update(
        architecture=spec.name,
        tag=default_tag(spec),
        custom_load=False,
        input_size=(t.in_chans, *t.img_size),
        fixed_input_size=not dynamic,
        mean=stats_for_channels(data.mean or base.get("mean", (0.485, 0.456, 0.406)), t.in_chans),
        std=stats_for_channels(data.std or base.get("std", (0.229, 0.224, 0.225)), t.in_chans),
        num_classes=t.num_classes,
        label_names=spec.card.label_names or (base.get("label_names") if same_classes else None),
        label_descriptions=base.get("label_descriptions") if same_classes and not spec.card.label_names else None,
        license=spec.card.license or base.get("license"),
        description=spec.card.description or f"{spec.base} adapted by timm-anysize to {t.describe()}",
    )
    for key in ("crop_pct", "crop_mode", "interpolation"):
        if getattr(data, key) is not None:
            cfg[key] = getattr(data, key)
    cfg.update(weights if weights is not None else _weight_location(spec, base))
    return {k: v for k, v in cfg.items() if v is not None or k in ("first_conv", "classifier")}


def _scaled_size(size: Sequence[int], base: Mapping[str, Any], t: Geometry) -> tuple[int, ...]:
    """A base cfg size ``(C, H, W)`` at the variant's geometry: H and W scaled by target / base input size, rounded
    to whole patches (at least one), C the variant's channels."""
    base_hw = base.get("input_size", (0, *t.img_size))[1:]
    step = t.patch_size or (1, 1)
    out = [t.in_chans]
    for s, b, n, p in zip(size[1:], base_hw, t.img_size, step):
        out.append(max(p, round(s * n / b / p) * p))
    return tuple(out)


def _geometry_fields(base: Mapping[str, Any], t: Geometry, feature_size: Optional[tuple[int, int]]) -> dict[str, Any]:
    """``pool_size`` (forward_features at the variant's size), and ``test_input_size`` / ``min_input_size`` where the
    base has them, scaled to the variant's geometry."""
    out: dict[str, Any] = {}
    if feature_size is not None:
        out["pool_size"] = feature_size
    for key in ("test_input_size", "min_input_size"):
        if base.get(key):
            out[key] = _scaled_size(base[key], base, t)
    if out.get("test_input_size") and base.get("test_crop_pct"):
        out["test_crop_pct"] = base["test_crop_pct"]
    return out


def build_variant(
    spec: VariantSpec,
    pretrained: bool = False,
    pretrained_cfg: Optional[Union[str, dict[str, Any], Any]] = None,
    pretrained_cfg_overlay: Optional[dict[str, Any]] = None,
    cache_dir: Optional[Union[str, Path]] = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a variant model, adapting its pretrained weights when ``pretrained`` is True.

    This is the body of every registered entrypoint; call ``timm.create_model(name, ...)`` rather than this.

    Args:
        spec: The variant.
        pretrained: Load and adapt the weights named by the variant's pretrained cfg.
        pretrained_cfg: A tag, cfg dict or PretrainedCfg, as ``timm.create_model`` passes it.
        pretrained_cfg_overlay: Cfg fields to override (``file=...`` to load another checkpoint of the same
            source geometry).
        cache_dir: Cache folder for Hub and URL downloads.
        **kwargs: Model kwargs; they override the spec (``img_size``, ``num_classes``, ``in_chans``, ...).

    Returns:
        The model; ``model.pretrained_cfg`` describes the variant, and ``timm_anysize.adaptation_report(model)``
        says how each tensor was obtained.
    """
    features_only = kwargs.pop("features_only", False)
    feature_cfg = {k: kwargs.pop(k) for k in ("out_indices", "feature_cls") if k in kwargs}
    cfg_obj = resolve_pretrained_cfg(spec.name, pretrained_cfg, pretrained_cfg_overlay)
    # Read the fields directly: PretrainedCfg.to_dict() would deep-copy an in-memory state_dict.
    resolved = {f.name: getattr(cfg_obj, f.name) for f in dataclasses.fields(cfg_obj)}
    # 1. The plan: both geometries, and the config.json that speaks for the weights to be read (read once, here).
    plan = make_plan(spec, kwargs, weights=resolved if pretrained else None, cache_dir=cache_dir)
    if str(kwargs.get("device", "")) != "meta":  # the plan accepted the geometry in some dtype: this one must fit
        check_build_memory(plan, kwargs.get("dtype"))
    # 2. The weights, read from their source and mapped to timm's names from their origin, checked against the plan.
    source = load_source_state_dict(source_read(plan), resolved, cache_dir) if pretrained else None
    # 3. The model at the variant's geometry. To be loaded, its parameters are allocated but never written (no
    #    init, never resident): 4. the weights adapted to it take their place one tensor at a time, in the model's
    #    dtype and on its device; only the tensors the load does not cover (a new head, a declared init) are
    #    initialised.
    model_kwargs = {**plan.target_kwargs, **plan.dynamic_kwargs}
    model = _create(plan.spec.base, model_kwargs, source is not None, plan.family)
    if source is not None:
        model._anysize_report = _load_adapted(model, plan, *source)
    weights = {k: resolved.get(k) for k in ("url", "file", "hf_hub_id", "hf_hub_filename")}
    cfg = variant_pretrained_cfg(plan, weights)
    cfg["tag"] = resolved.get("tag") or cfg["tag"]
    model._anysize_plan = plan  # what export needs: base arch, model args, geometries
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    # 5. Run-time features: any input size, a flexi patch size, timm's feature wrapper.
    if plan.dynamic and not features_only:  # a feature model makes its own inner model dynamic
        _make_dynamic(plan, model)
    elif not features_only:  # its own size only (a native family's model runs at any size, as timm's)
        first = plan.patch_key.removesuffix(".weight")
        guard_run_time_size(model, plan.family, plan.target.img_size, False, first, plan.family.dynamic != "native")
    apply_flexi(model, plan.spec)  # the YAML flexi key: a patch size drawn per training forward (timm_anysize.flexi)
    if features_only:
        model = _as_feature_model(plan.spec, plan, model, feature_cfg, cfg)
    return model


def _load_adapted(
    model: nn.Module,
    plan: VariantPlan,
    source_sd: dict[str, torch.Tensor],
    source_desc: str,
) -> AdaptationReport:
    """Adapt the source weights to the model's tensors (refusing non-finite ones) and load them, strictly.

    The model's parameters were never written (:func:`_create`): each adapted tensor is cast to the model's dtype
    and moved to its device one at a time (a no-op, keeping the checkpoint's memory-mapped storage, where both
    already match) and assigned in their place. The source dict is emptied once adapted, so a source a resampled
    tensor replaces is freed before the load. Tensors no checkpoint key covers are initialised last.
    """
    refuse_non_finite(source_sd, source_desc, {k for k, _ in model.named_buffers()})
    target_sd = model.state_dict()
    state_dict, report = adapt_state_dict(source_sd, target_sd, plan, source_desc)
    source_sd.clear()  # the adapted dict holds what is used; the rest (dropped keys, replaced sources) goes now
    fresh = report.by_action("initialized")  # the model's own (uninitialised) tensors: initialised below
    for key in list(state_dict):
        like, value = target_sd[key], state_dict.pop(key)
        if key not in fresh:  # an adapted tensor can be a strided view (a channel map): the model's are contiguous
            # and aligned as torch allocates them (a tensor taken from a file at an odd offset computes other bits)
            value = owned_aligned(value.to(device=like.device, dtype=like.dtype).contiguous())
        state_dict[key] = value
    del target_sd
    model.load_state_dict(state_dict, strict=True, assign=True)
    del state_dict
    initialize_fresh(model, fresh)
    _logger.info(
        "%s: loaded from %s (%d copied, %d not copied)",
        plan.spec.name,
        source_desc,
        len(report.by_action("copied")),
        len(report.non_copied()),
    )
    return report


def _create(base: str, kwargs: dict[str, Any], for_load: bool, family: Family) -> nn.Module:
    """Build the target model; ``for_load``: with its parameters allocated but not initialised (never resident),
    for an assigning load.

    A family with its own ``build`` (MViTv2) builds it. Buffers are always real (computed by the constructor).
    """
    create = partial(timm.create_model, base, pretrained=False)
    context = parameters_uninitialised() if for_load else contextlib.nullcontext()
    with context:
        return family.create(create, kwargs)


def _make_dynamic(plan: VariantPlan, model: nn.Module) -> None:
    spec = plan.spec
    if plan.family.dynamic == "native":  # timm's constructor arguments did it (plan.dynamic_kwargs)
        model._anysize_native_dynamic = True
    else:
        pe = spec.adapt.pos_embed
        # compat: run-time sizes resample as the origin library does (timm_anysize.core.compat)
        enable_dynamic(
            model, pad=spec.pad, interpolation=pe.interpolation, antialias=pe.use_antialias, compat=pe.compat
        )
    # a size below the smallest its stem and strides take, or off its stem's blocks: the documented error, first
    guard_run_time_size(model, plan.family, plan.target.img_size, spec.pad, plan.patch_key.removesuffix(".weight"))


def _feature_key_map(wrapper_keys: list[str], full_keys: list[str]) -> dict[str, str]:
    """Wrapper key -> model key for timm's feature wrappers: ``model.`` (FeatureGetterNet) / ``body.``
    (FeatureHookNet) prefixes, and FeatureListNet's flattened module names (``layers_0.blocks...`` for
    ``layers.0.blocks...``)."""
    flattened: dict[str, str] = {}
    for key in full_keys:
        parts = key.split(".")
        for i in range(1, len(parts)):
            flattened.setdefault("_".join(parts[:i]) + "." + ".".join(parts[i:]), key)
    out = {}
    for wk in wrapper_keys:
        key = wk.split(".", 1)[1] if wk.startswith(("model.", "body.")) else wk
        out[wk] = key if key in full_keys else flattened.get(key, "")
    return out


def _as_fx_feature_model(
    plan: VariantPlan, model: nn.Module, timm_wrapper: nn.Module, cfg: dict[str, Any]
) -> nn.Module:
    """``feature_cls='fx'``: timm's FX feature wrapper traced from the adapted model itself (made dynamic first, so
    the graph records the dynamic path); ``timm_wrapper`` (the family's default feature wrapper) gives the
    indices."""
    if plan.dynamic:
        _make_dynamic(plan, model)
    wrapper = FeatureGraphNet(
        model, out_indices=tuple(timm_wrapper.feature_info.out_indices), output_fmt=getattr(model, "output_fmt", "NCHW")
    )
    report = getattr(model, "_anysize_report", None)
    if report is not None:
        kept = {k.split(".", 1)[1] for k in wrapper.state_dict()}
        for key in model.state_dict().keys() - kept:
            report.dropped[key] = "pruned by features_only"
        wrapper._anysize_report = report
    features_cfg = {k: v for k, v in cfg.items() if k not in ("num_classes", "classifier", "global_pool")}
    features_cfg["fixed_input_size"] = not plan.dynamic
    wrapper.pretrained_cfg = wrapper.default_cfg = features_cfg
    return wrapper


def _as_feature_model(
    spec: VariantSpec, plan: VariantPlan, model: nn.Module, feature_cfg: dict[str, Any], cfg: dict[str, Any]
) -> nn.Module:
    """timm's feature wrapper (``features_only=True``) holding the adapted weights; built through create_model.

    Every tensor of the wrapper is taken from the adapted model under the wrapper's naming; what the wrapper prunes
    is recorded as dropped. Families whose feature path runs through timm-anysize's dynamic code stay dynamic;
    the others take the variant's own size.
    """
    dynamic = plan.dynamic and plan.family.dynamic_features
    kwargs = plan.family.dynamic_kwargs(dynamic, spec.pad) if dynamic else {}
    create = partial(timm.create_model, spec.base, pretrained=False, features_only=True, **feature_cfg)
    all_kwargs = {**plan.target_kwargs, **kwargs}
    fx = feature_cfg.get("feature_cls") in ("fx", FeatureGraphNet)
    if fx:  # timm would trace the model it builds; the graph must record the adapted, dynamic model instead
        create = partial(
            timm.create_model,
            spec.base,
            pretrained=False,
            features_only=True,
            **{k: v for k, v in feature_cfg.items() if k != "feature_cls"},
        )
    wrapper = plan.family.create(create, all_kwargs)
    if fx:
        return _as_fx_feature_model(plan, model, wrapper, cfg)
    full, kept = model.state_dict(), wrapper.state_dict()
    names = _feature_key_map(list(kept), list(full))
    unmapped = [k for k, v in names.items() if not v or full[v].shape != kept[k].shape]
    if unmapped:
        raise WeightsError(
            f"{spec.name}: features_only: cannot match the feature wrapper's {unmapped[:4]} to the "
            f"model's tensors; create the full model and use forward_intermediates instead"
        )
    wrapper.load_state_dict({k: full[v] for k, v in names.items()}, strict=True)
    report = getattr(model, "_anysize_report", None)
    if report is not None:
        for key in full.keys() - set(names.values()):
            report.dropped[key] = "pruned by features_only"
        wrapper._anysize_report = report
    inner = getattr(wrapper, "model", None)
    if inner is None and isinstance(getattr(wrapper, "body", None), nn.Module):  # FeatureHookNet(no_rewrite): PiT
        inner = wrapper.body
    if dynamic:
        _make_dynamic(plan, inner if inner is not None else wrapper)
    if inner is not None:
        inner.pretrained_cfg = inner.default_cfg = cfg
        inner._anysize_report = report
    # As timm's pretrained_cfg_for_features: a feature model has no classifier.
    features_cfg = {k: v for k, v in cfg.items() if k not in ("num_classes", "classifier", "global_pool")}
    features_cfg["fixed_input_size"] = not dynamic
    wrapper.pretrained_cfg = wrapper.default_cfg = features_cfg
    return wrapper
