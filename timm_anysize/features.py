"""``features_only=True``: timm's feature wrapper around the variant's one model, as timm's ``build_model_with_cfg``
makes it (``feature_cls(model, **feature_cfg)``).

The builder (:mod:`timm_anysize.builder`) builds the model once, through timm with ``features_only=True``, so that
timm wraps it (and prunes what the features do not use) with the architecture's own feature class and defaults;
the adapted weights are then loaded into the wrapper under its names (:func:`model_key_map`). With
``feature_cls='fx'`` the loaded (and dynamic) full model is traced instead (:func:`fx_feature_model`): timm would
trace the model it builds, before the weights and the dynamic path exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch.nn as nn
from timm.models import FeatureGraphNet, FeatureInfo

from timm_anysize.core.attributes import module_attr, set_pretrained_cfg
from timm_anysize.core.errors import WeightsError
from timm_anysize.core.meta import build_meta
from timm_anysize.core.report import AdaptationReport, adaptation_report, keep_report
from timm_anysize.core.variant_plan import VariantPlan

__all__ = [
    "FeatureRequest",
    "feature_key_map",
    "model_key_map",
    "pruned_keys",
    "inner_model",
    "wrap_up",
    "fx_out_indices",
    "fx_feature_model",
    "PRUNED",
]

PRUNED = "pruned by features_only"


@dataclass(frozen=True)
class FeatureRequest:
    """What ``timm.create_model(..., features_only=True, out_indices=..., feature_cls=...)`` asks for.

    Example:
        >>> kwargs = {"features_only": True, "out_indices": (1, 3), "img_size": 64}
        >>> FeatureRequest.pop(kwargs), kwargs
        (FeatureRequest(timm_kwargs={'out_indices': (1, 3)}), {'img_size': 64})
    """

    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # out_indices / feature_cls as given

    @classmethod
    def pop(cls, kwargs: dict[str, Any]) -> Optional[FeatureRequest]:
        """The request in create_model's ``kwargs`` (taken out of them), or None without ``features_only``."""
        features_only = kwargs.pop("features_only", False)
        request: dict[str, Any] = {k: kwargs.pop(k) for k in ("out_indices", "feature_cls") if k in kwargs}
        return cls(request) if features_only else None

    @property
    def fx(self) -> bool:
        """timm's FX feature wrapper: traced from the loaded model rather than built by timm."""
        return self.timm_kwargs.get("feature_cls") in ("fx", FeatureGraphNet)

    def dynamic(self, plan: VariantPlan) -> bool:
        """Whether the feature model runs at any size: the variant does and its family's feature path is dynamic
        (the others take the variant's own size); the FX wrapper traces the model as the variant runs it."""
        return plan.dynamic and (self.fx or plan.family.dynamic_features)

    def model_kwargs(self, plan: VariantPlan) -> dict[str, Any]:
        """The timm constructor kwargs of the model the wrapper holds (the FX wrapper's: the variant's own)."""
        if self.fx:
            return {**plan.target_kwargs, **plan.dynamic_kwargs}
        dynamic = self.dynamic(plan)
        return {**plan.target_kwargs, **(plan.family.dynamic_kwargs(dynamic, plan.spec.pad) if dynamic else {})}


def feature_key_map(wrapper_keys: list[str], model_keys: list[str]) -> dict[str, str]:
    """Wrapper key -> model key for timm's feature wrappers: ``model.`` (FeatureGetterNet) / ``body.``
    (FeatureHookNet) prefixes, and FeatureListNet's flattened module names (``layers_0.blocks...`` for
    ``layers.0.blocks...``); "" where no model key matches.

    Example:
        >>> feature_key_map(["layers_0.blocks.0.w", "model.norm.w"], ["layers.0.blocks.0.w", "norm.w"])
        {'layers_0.blocks.0.w': 'layers.0.blocks.0.w', 'model.norm.w': 'norm.w'}
    """
    flattened: dict[str, str] = {}
    for key in model_keys:
        parts = key.split(".")
        for i in range(1, len(parts)):
            flattened.setdefault("_".join(parts[:i]) + "." + ".".join(parts[i:]), key)
    known = set(model_keys)
    out = {}
    for wk in wrapper_keys:
        key = wk.split(".", 1)[1] if wk.startswith(("model.", "body.")) else wk
        out[wk] = key if key in known else flattened.get(key, "")
    return out


def model_key_map(wrapper: nn.Module, plan: VariantPlan) -> dict[str, str]:
    """Each tensor of a feature wrapper timm built -> its key in the variant's model (timm's layout, the keys the
    weights are adapted under).

    Raises:
        WeightsError: A wrapper tensor matches no tensor of the model.
    """
    names = feature_key_map(list(wrapper.state_dict()), list(plan.source_shapes))
    unmapped = [k for k, v in names.items() if not v]
    if unmapped:
        raise WeightsError(
            f"{plan.spec.name}: features_only: cannot match the feature wrapper's {unmapped[:4]} to the "
            f"model's tensors; create the full model and use forward_intermediates instead"
        )
    return names


def pruned_keys(plan: VariantPlan, kept: set[str]) -> set[str]:
    """The model's tensors a feature wrapper pruned (later blocks, the final norm, the head): those of the model at
    the source geometry that it does not hold. A head the variant has none of (``num_classes=0``) is not pruned."""
    no_head = set(plan.classifier_keys) if plan.target.num_classes == 0 else set()
    return plan.source_shapes.keys() - kept - no_head


def inner_model(wrapper: nn.Module) -> Optional[nn.Module]:
    """The model a feature wrapper holds whole (FeatureGetterNet's ``model``, FeatureHookNet's ``body``), or None
    where timm flattened its modules into the wrapper."""
    inner = getattr(wrapper, "model", None)
    if inner is None and isinstance(getattr(wrapper, "body", None), nn.Module):  # FeatureHookNet(no_rewrite): PiT
        inner = wrapper.body
    return inner if isinstance(inner, nn.Module) else None


def features_cfg(cfg: dict[str, Any], dynamic: bool) -> dict[str, Any]:
    """A feature model's pretrained cfg, as timm's ``pretrained_cfg_for_features``: no classifier."""
    out = {k: v for k, v in cfg.items() if k not in ("num_classes", "classifier", "global_pool")}
    out["fixed_input_size"] = not dynamic
    return out


def wrap_up(wrapper: nn.Module, cfg: dict[str, Any], report: Optional[AdaptationReport], dynamic: bool) -> nn.Module:
    """The cfgs and the report of a feature wrapper timm built: the wrapper's without a classifier, the variant's
    on the model it holds.

    Example:
        >>> import timm
        >>> w = timm.create_model("test_vit", features_only=True, out_indices=(1,))
        >>> w = wrap_up(w, {"num_classes": 10, "input_size": (3, 64, 64)}, None, True)
        >>> w.pretrained_cfg, w.model.pretrained_cfg["num_classes"]
        ({'input_size': (3, 64, 64), 'fixed_input_size': False}, 10)
    """
    inner = inner_model(wrapper)
    if inner is not None:
        set_pretrained_cfg(inner, cfg)
        if report is not None:
            keep_report(inner, report)
    if report is not None:
        keep_report(wrapper, report)
    set_pretrained_cfg(wrapper, features_cfg(cfg, dynamic))
    return wrapper


def fx_out_indices(plan: VariantPlan, request: FeatureRequest) -> tuple[int, ...]:
    """The ``out_indices`` of timm's default feature wrapper of the variant (the architecture's own defaults, or the
    ones given, normalised as that wrapper does): read off one built on the meta device."""
    kwargs = {k: v for k, v in request.timm_kwargs.items() if k != "feature_cls"}
    model_kwargs = {**plan.target_kwargs, **plan.dynamic_kwargs, "features_only": True, **kwargs}
    wrapper = build_meta(plan.spec, model_kwargs, "features_only", plan.family)
    return tuple(module_attr(wrapper, "feature_info", FeatureInfo).out_indices)


def fx_feature_model(
    plan: VariantPlan, model: nn.Module, out_indices: tuple[int, ...], cfg: dict[str, Any]
) -> nn.Module:
    """``feature_cls='fx'``: timm's FX feature wrapper traced from the loaded model itself (made dynamic first, so
    the graph records the dynamic path)."""
    wrapper = FeatureGraphNet(model, out_indices=out_indices, output_fmt=getattr(model, "output_fmt", "NCHW"))
    report = adaptation_report(model)
    if report is not None:
        kept = {k.split(".", 1)[1] for k in wrapper.state_dict()}
        for key in model.state_dict().keys() - kept:
            report.dropped[key] = PRUNED
        keep_report(wrapper, report)
    set_pretrained_cfg(wrapper, features_cfg(cfg, plan.dynamic))
    return wrapper
