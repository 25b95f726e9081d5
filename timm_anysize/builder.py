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
from typing import Any, Optional, Union

import timm
import torch
import torch.nn as nn
from timm.models import resolve_pretrained_cfg

from timm_anysize.adapt import adapt_state_dict
from timm_anysize.core.attributes import set_pretrained_cfg
from timm_anysize.core.family import Family
from timm_anysize.core.memory import check_build_memory
from timm_anysize.core.meta import initialize_fresh, parameters_uninitialised
from timm_anysize.core.report import AdaptationReport, keep_report
from timm_anysize.core.safetensors_io import owned_aligned
from timm_anysize.core.spec import VariantSpec
from timm_anysize.core.variant_plan import VariantPlan
from timm_anysize.dynamic import enable_dynamic, guard_run_time_size, mark_native_dynamic
from timm_anysize.features import (
    PRUNED,
    FeatureRequest,
    fx_feature_model,
    fx_out_indices,
    inner_model,
    model_key_map,
    pruned_keys,
    wrap_up,
)
from timm_anysize.flexi import apply_flexi
from timm_anysize.model_plan import keep_plan
from timm_anysize.naflex import NAFLEX_ONLY_KWARGS, to_naflex
from timm_anysize.plan import make_plan, source_read
from timm_anysize.pretrained_cfg import variant_pretrained_cfg
from timm_anysize.source_weights import load_source_state_dict, refuse_non_finite

__all__ = ["build_variant"]

_logger = logging.getLogger(__name__)


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
    features = FeatureRequest.pop(kwargs)
    use_naflex = kwargs.pop("use_naflex", False)  # built as the variant, then converted (timm_anysize.naflex)
    naflex_kwargs = {k: kwargs.pop(k) for k in NAFLEX_ONLY_KWARGS if use_naflex and k in kwargs}
    cfg_obj = resolve_pretrained_cfg(spec.name, pretrained_cfg, pretrained_cfg_overlay)
    # Read the fields directly: PretrainedCfg.to_dict() would deep-copy an in-memory state_dict.
    resolved = {f.name: getattr(cfg_obj, f.name) for f in dataclasses.fields(cfg_obj)}
    # 1. The plan: both geometries, and the config.json that speaks for the weights to be read (read once, here).
    plan = make_plan(spec, kwargs, weights=resolved if pretrained else None, cache_dir=cache_dir)
    if str(kwargs.get("device", "")) != "meta":  # the plan accepted the geometry in some dtype: this one must fit
        check_build_memory(plan, kwargs.get("dtype"))
    # 2. The weights, read from their source and mapped to timm's names from their origin, checked against the plan.
    source = load_source_state_dict(source_read(plan), resolved, cache_dir) if pretrained else None
    if source is not None and spec.model_args.get("use_naflex") and not _naflex_layout(source[0]):
        # model_args use_naflex with a classic ViT/EVA checkpoint (any origin): the classic model is built from it
        # and converted, as the use_naflex=True keyword does (each origin's resampling rule kept; timm_anysize.naflex)
        spec = spec.model_copy(update={"model_args": {k: v for k, v in spec.model_args.items() if k != "use_naflex"}})
        naflex_kwargs = {k: kwargs.pop(k) for k in NAFLEX_ONLY_KWARGS if k in kwargs}
        plan, use_naflex = make_plan(spec, kwargs, weights=resolved, cache_dir=cache_dir), True
    if use_naflex and plan.family.name == "naflexvit":  # a NaFlexViT variant is one already: its arguments are its own
        use_naflex = False
        if naflex_kwargs:
            kwargs.update(naflex_kwargs)
            plan = make_plan(spec, kwargs, weights=resolved if pretrained else None, cache_dir=cache_dir)
    # features_only with use_naflex: timm's feature wrapper of the NaFlexVit, made with it (last)
    naflex_features, features = (features, None) if use_naflex else (None, features)
    # 3. The model at the variant's geometry, built once. To be loaded, its parameters are allocated but never
    #    written (no init, never resident): 4. the weights adapted to it take their place one tensor at a time, in
    #    the model's dtype and on its device; only the tensors the load does not cover (a new head, a declared init)
    #    are initialised. features_only: timm builds it and wraps it (pruning what the features do not use) as for
    #    its own models; the weights are loaded into the wrapper, under its names.
    wrapped = features if features is not None and not features.fx else None  # timm wraps the model it builds
    model_kwargs = (
        features.model_kwargs(plan) if features is not None else {**plan.target_kwargs, **plan.dynamic_kwargs}
    )
    timm_kwargs = dict(features_only=True, **wrapped.timm_kwargs) if wrapped is not None else {}
    model = _create(plan.spec.base, model_kwargs, source is not None, plan.family, timm_kwargs)
    report = None
    if source is not None:
        names = model_key_map(model, plan) if wrapped is not None else None
        report = _load_adapted(model, plan, *source, names)
    weights = {k: resolved.get(k) for k in ("url", "file", "hf_hub_id", "hf_hub_filename")}
    cfg = variant_pretrained_cfg(plan, weights)
    cfg["tag"] = resolved.get("tag") or cfg["tag"]
    # 5. Run-time features: any input size, a flexi patch size, timm's feature wrapper.
    if wrapped is not None:  # the model the wrapper holds runs at any size where its family's features do
        dynamic = wrapped.dynamic(plan)
        if dynamic:
            inner = inner_model(model)
            _make_dynamic(plan, inner if inner is not None else model)
        return wrap_up(model, cfg, report, dynamic)
    if report is not None:
        keep_report(model, report)
    keep_plan(model, plan)  # what export needs: base arch, model args, geometries
    set_pretrained_cfg(model, cfg)
    if plan.dynamic and features is None:  # the FX wrapper makes it dynamic after flexi, before tracing it
        _make_dynamic(plan, model)
    elif features is None:  # its own size only (a native family's model runs at any size, as timm's)
        first = plan.patch_key.removesuffix(".weight")
        guard_run_time_size(model, plan.family, plan.target.img_size, False, first, plan.family.dynamic != "native")
    apply_flexi(model, plan.spec)  # the YAML flexi key: a patch size drawn per training forward (timm_anysize.flexi)
    if features is not None:  # feature_cls='fx': timm's FX wrapper traced from the loaded (dynamic) model
        out_indices = fx_out_indices(plan, features)
        if plan.dynamic:
            _make_dynamic(plan, model)
        return fx_feature_model(plan, model, out_indices, cfg)
    if use_naflex:
        model = to_naflex(model, naflex_features, **naflex_kwargs)
    return model


def _naflex_layout(state_dict: dict[str, Any]) -> bool:
    """Whether a checkpoint is in NaFlexVit's own layout (its patch projection under ``embeds``)."""
    return any(k.endswith("embeds.proj.weight") for k in state_dict)


def _load_adapted(
    model: nn.Module,
    plan: VariantPlan,
    source_sd: dict[str, torch.Tensor],
    source_desc: str,
    names: Optional[dict[str, str]] = None,
) -> AdaptationReport:
    """Adapt the source weights to the model's tensors (refusing non-finite ones) and load them, strictly.

    The model's parameters were never written (:func:`_create`): each adapted tensor is cast to the model's dtype
    and moved to its device one at a time (a no-op, keeping the checkpoint's memory-mapped storage, where both
    already match) and assigned in their place. The source dict is emptied once adapted, so a source a resampled
    tensor replaces is freed before the load. Tensors no checkpoint key covers are initialised last.

    ``names``: ``model`` is timm's feature wrapper of the variant's model, whose key ``k`` is ``names[k]`` in the
    variant's model (the weights are adapted under those); what the wrapper pruned is reported so, not read.
    """
    own = model.state_dict()
    to_model = names if names is not None else {k: k for k in own}
    to_own = {v: k for k, v in to_model.items()}
    buffers = {to_model.get(k, k) for k, _ in model.named_buffers()}
    pruned = pruned_keys(plan, set(to_own)) & source_sd.keys() if names is not None else set()
    for key in pruned:
        del source_sd[key]
    refuse_non_finite(source_sd, source_desc, buffers)
    target_sd = {to_model[k]: v for k, v in own.items()}
    del own
    state_dict, report = adapt_state_dict(source_sd, target_sd, plan, source_desc)
    for key in sorted(pruned):
        report.dropped[key] = PRUNED
    source_sd.clear()  # the adapted dict holds what is used; the rest (dropped keys, replaced sources) goes now
    fresh = report.by_action("initialized")  # the model's own (uninitialised) tensors: initialised below
    for key in list(state_dict):
        like, value = target_sd[key], state_dict.pop(key)
        if key not in fresh:  # an adapted tensor can be a strided view (a channel map): the model's are contiguous
            # and aligned as torch allocates them (a tensor taken from a file at an odd offset computes other bits)
            value = owned_aligned(value.to(device=like.device, dtype=like.dtype).contiguous())
        state_dict[to_own[key]] = value
    del target_sd
    model.load_state_dict(state_dict, strict=True, assign=True)
    del state_dict
    initialize_fresh(model, [to_own[k] for k in fresh])
    _logger.info(
        "%s: loaded from %s (%d copied, %d not copied)",
        plan.spec.name,
        source_desc,
        len(report.by_action("copied")),
        len(report.non_copied()),
    )
    return report


def _create(
    base: str, kwargs: dict[str, Any], for_load: bool, family: Family, timm_kwargs: Optional[dict[str, Any]] = None
) -> nn.Module:
    """Build the target model; ``for_load``: with its parameters allocated but not initialised (never resident),
    for an assigning load. ``timm_kwargs``: ``timm.create_model`` arguments that are not the model's
    (``features_only``, ``out_indices``, ``feature_cls``).

    A family with its own ``build`` (MViTv2) builds it. Buffers are always real (computed by the constructor).
    """
    create = partial(timm.create_model, base, pretrained=False, **(timm_kwargs or {}))
    context = parameters_uninitialised() if for_load else contextlib.nullcontext()
    with context:
        return family.create(create, kwargs)


def _make_dynamic(plan: VariantPlan, model: nn.Module) -> None:
    spec = plan.spec
    if plan.family.dynamic == "native":  # timm's constructor arguments did it (plan.dynamic_kwargs)
        mark_native_dynamic(model)
    else:
        pe = spec.adapt.pos_embed
        # compat: run-time sizes resample as the origin library does (timm_anysize.core.compat)
        enable_dynamic(
            model, pad=spec.pad, interpolation=pe.interpolation, antialias=pe.use_antialias, compat=pe.compat
        )
    # a size below the smallest its stem and strides take, or off its stem's blocks: the documented error, first
    guard_run_time_size(model, plan.family, plan.target.img_size, spec.pad, plan.patch_key.removesuffix(".weight"))
