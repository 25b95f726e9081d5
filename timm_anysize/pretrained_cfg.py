"""A variant's pretrained cfg: the base's, rewritten for the variant's geometry and weights.

timm's ``PretrainedCfg`` describes the *weights* of a model and how to feed it (input size, channels, mean/std,
classes). A variant registers one (:func:`spec_pretrained_cfg`, from the spec and the base's cfg alone, before its
plan is made) and each model it builds carries one (:func:`variant_pretrained_cfg`, from the plan), so
``timm.data.resolve_data_config(model=m)`` gives the variant's own transforms. The registry
(:mod:`timm_anysize.registry`) and the builder (:mod:`timm_anysize.builder`) both take it from here.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from timm_anysize.core.spec import VariantSpec
from timm_anysize.plan import Geometry, VariantPlan, patch_from_model, resolve_base_cfg, spec_target

__all__ = ["variant_pretrained_cfg", "spec_pretrained_cfg", "stats_for_channels", "default_tag"]

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
        >>> from timm_anysize.plan import make_plan
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
