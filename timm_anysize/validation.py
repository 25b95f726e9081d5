"""Validation of a variant's plan: every geometry the spec asks for is checked while the plan is made, on meta-device
models (no memory, no weights read), so that nothing validation accepts fails later.

:func:`timm_anysize.plan.make_plan` calls these in order: the changes the spec asks for and the sizes the family's
stages take (:func:`check_requested`), the changes the built target makes (:func:`check_target`), the memory
(:mod:`timm_anysize.core.memory`), whole patches and the channel map (:func:`check_patches_and_channels`), one forward
at the variant's own size (:func:`check_runs_at_own_size`) and, for an architecture without a family row, every tensor
whose shape the geometry changes (:func:`refuse_geometry_bound`). Each refusal names the key, the bad value and the
fix, with the nearest sizes that work where there are some.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from timm_anysize.core.errors import AdaptationError, SpecError
from timm_anysize.core.family import Family
from timm_anysize.core.geometry import Geometry, classify_changes
from timm_anysize.core.meta import EmptyOutputError, build_meta, no_empty_outputs
from timm_anysize.core.padding import nearest_multiples
from timm_anysize.core.report import summarize_keys
from timm_anysize.core.spec import Size2, VariantSpec, as_pair
from timm_anysize.core.variant_plan import VariantPlan
from timm_anysize.dynamic import enable_dynamic

__all__ = [
    "refuse_unsupported",
    "check_requested",
    "check_size_multiples",
    "check_target",
    "check_patches_and_channels",
    "check_runs_at_own_size",
    "refuse_geometry_bound",
]


def refuse_unsupported(spec: VariantSpec, family: Family, changes: Sequence[str]) -> None:
    """Refuse the first of ``changes`` (:data:`~timm_anysize.core.family.GEOMETRY_CHANGES`) the family cannot take
    (``Family.unsupported``), with its reason.

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> from timm_anysize.families import FAMILIES
        >>> mixer = next(f for f in FAMILIES if f.name == "mlp_mixer")
        >>> spec = parse_variant("v", {"base": "mixer_b16_224"})
        >>> refuse_unsupported(spec, mixer, ["in_chans_1", "img_larger"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        timm_anysize.core.errors.SpecError: <dict>: v: the mlp_mixer family cannot take img_larger: its token-mixing...
    """
    for change in changes:
        reason = family.unsupported.get(change)
        if reason:
            raise SpecError(f"{spec.where}: the {family.name} family cannot take {change}: {reason}")


def _requested_changes(spec: VariantSpec, source: Geometry, target_kwargs: dict[str, Any]) -> list[str]:
    """The geometry changes a spec asks for, from its own fields (before the target model is built)."""

    def size2(v: Any) -> Optional[Size2]:
        return None if v is None else as_pair(v)

    requested = dataclasses.replace(
        source,
        img_size=size2(target_kwargs.get("img_size")) or source.img_size,
        patch_size=size2(target_kwargs.get("patch_size")) or source.patch_size,
        in_chans=target_kwargs.get("in_chans", source.in_chans),
    )
    return classify_changes(source, requested)


def check_requested(
    spec: VariantSpec, family: Family, source: Geometry, source_model: nn.Module, target_kwargs: dict[str, Any]
) -> None:
    """Before the target model is built: the changes the spec asks for (``target_kwargs``: what the target will be
    built with), the sizes the family's stages can take, and ``dynamic: true`` for a family that cannot run at any
    size.

    Raises:
        SpecError: The family cannot take a change, its stages the size, or it cannot run at any size.

    Example:
        >>> import timm
        >>> from timm_anysize.core.meta import meta_device
        >>> from timm_anysize.core.spec import parse_variant
        >>> from timm_anysize.families import family_of
        >>> from timm_anysize.timm_geometry import geometry_of
        >>> with meta_device():
        ...     model = timm.create_model("mixer_s16_224")
        >>> mixer, spec = family_of(model), parse_variant("v", {"base": "mixer_s16_224", "img_size": 64})
        >>> check_requested(spec, mixer, geometry_of(model, mixer), model, {"img_size": 64})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        timm_anysize.core.errors.SpecError: <dict>: v: the mlp_mixer family cannot take img_larger: its token-mixing...
    """
    refuse_unsupported(spec, family, _requested_changes(spec, source, target_kwargs))
    check_size_multiples(spec, family, source_model, target_kwargs.get("img_size"))
    if spec.dynamic and not family.supports_dynamic:
        raise SpecError(
            f"{spec.where}.dynamic: the {family.name} family cannot run at any input size: {family.dynamic_reason}; "
            f"set dynamic: false (or leave it out: it defaults to what the family supports)"
        )


def _nearest_that_fit(size: int, axis: int, fits: Callable[[int, int], bool]) -> list[int]:
    """The closest sizes below and above ``size`` (on one axis) for which ``fits(axis, candidate)``."""
    below = next((c for c in range(size - 1, 0, -1) if fits(axis, c)), None)
    above = next((c for c in range(size + 1, 64 * size + 64) if fits(axis, c)), None)
    return [c for c in (below, above) if c is not None]


def check_size_multiples(
    spec: VariantSpec, family: Family, model: nn.Module, img_size: Union[int, Sequence[int], None]
) -> None:
    """Reject an img_size whose branches/stages cannot run at it (``Family.size_multiples``), naming the
    constraint and the nearest sizes that work.

    Example:
        >>> import timm
        >>> from timm_anysize.core.meta import meta_device
        >>> from timm_anysize.core.spec import parse_variant
        >>> from timm_anysize.families import family_of
        >>> with meta_device():
        ...     model = timm.create_model("tnt_s_patch16_224", img_size=64)
        >>> check_size_multiples(parse_variant("v", {"base": "tnt_s_patch16_224"}), family_of(model), model, (70, 64))
        Traceback (most recent call last):
        ...
        timm_anysize.core.errors.SpecError: <dict>: v.img_size: tnt cannot run at [70, 64]: the pixel embedding gets \
[70, 64] px, and its height 70 is not a multiple of its patch 16; nearest heights that work: 64 or 80
    """
    if family.size_multiples is None or img_size is None:
        return
    size: Size2 = as_pair(img_size)
    size_multiples = family.size_multiples

    def fits(axis: int, candidate: int) -> bool:
        probe = (candidate, size[1]) if axis == 0 else (size[0], candidate)
        return all(got[axis] % mult[axis] == 0 for _, got, mult in size_multiples(model, probe))

    for what, got, mult in size_multiples(model, size):
        for axis, name in enumerate(("height", "width")):
            if got[axis] % mult[axis]:
                near = " or ".join(map(str, _nearest_that_fit(size[axis], axis, fits)))
                raise SpecError(
                    f"{spec.where}.img_size: {family.name} cannot run at {list(size)}: {what} gets "
                    f"{list(got)} px, and its {name} {got[axis]} is not a multiple of its patch {mult[axis]}; "
                    f"nearest {name}s that work: {near}"
                )


def check_target(
    spec: VariantSpec, family: Family, source: Geometry, target: Geometry, target_model: nn.Module, dynamic: bool
) -> None:
    """After the target model is built: the changes it makes (the spec's defaults included) and, for ``dynamic:
    false``, the ones timm's own model cannot run (``Family.static_unsupported``) and the multiple its sides must be
    (``Family.static_multiple``).

    Raises:
        SpecError: The family cannot take a change, or timm's own model cannot run the target's size.

    Example:
        >>> import timm
        >>> from timm_anysize.core.spec import parse_variant
        >>> from timm_anysize.families import family_of
        >>> model = timm.create_model("test_vit", img_size=(64, 96))
        >>> source = Geometry((160, 160), (16, 16), (10, 10), in_chans=3, num_classes=1000, num_prefix_tokens=1)
        >>> target = Geometry((64, 96), (16, 16), (4, 6), in_chans=3, num_classes=1000, num_prefix_tokens=1)
        >>> check_target(parse_variant("v", {"base": "test_vit"}), family_of(model), source, target, model, True)
    """
    changes = classify_changes(source, target)
    refuse_unsupported(spec, family, changes)
    if dynamic:
        return
    for change in changes:
        reason = family.static_unsupported.get(change)
        if reason:
            raise SpecError(
                f"{spec.where}.dynamic: false builds timm's own {family.name} model at img_size "
                f"{list(target.img_size)}, which cannot run it: {reason}; leave dynamic on (the default)"
            )
    m = family.static_multiple(target_model) if family.static_multiple is not None else 1
    if any(side % m for side in target.img_size):
        near = sorted({c for side in target.img_size if side % m for c in nearest_multiples(side, m)})
        raise SpecError(
            f"{spec.where}.img_size: dynamic: false builds timm's own {family.name} model at "
            f"{list(target.img_size)}, which runs only at sizes that are multiples of {m}; nearest sides: "
            f"{' or '.join(map(str, near))}; or leave dynamic on (the default)"
        )


def check_patches_and_channels(spec: VariantSpec, source: Geometry, target: Geometry) -> None:
    """Each side's patch divides its img_size, and a channel map (``adapt.channels.map``) has one entry per target
    channel, each a source channel or null.

    Raises:
        SpecError: A patch that does not divide the size, or a channel map that does not fit.

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> source = Geometry((224, 224), (16, 16), (14, 14), in_chans=3, num_classes=1000, num_prefix_tokens=1)
        >>> target = Geometry((60, 64), (16, 16), (3, 4), in_chans=3, num_classes=1000, num_prefix_tokens=1)
        >>> check_patches_and_channels(parse_variant("v", {"base": "test_vit"}), source, target)
        Traceback (most recent call last):
        ...
        timm_anysize.core.errors.SpecError: <dict>: v.img_size: the target patch size [16, 16] must divide the \
target img_size [60, 64]; pick a multiple of the patch
    """
    for geo, what, key in ((source, "source", "pretrained.img_size"), (target, "target", "img_size")):
        patch = geo.patch_size or (1, 1)
        for i, p in zip(geo.img_size, patch):
            if i % p:
                raise SpecError(
                    f"{spec.where}.{key}: the {what} patch size {list(patch)} must divide the "
                    f"{what} img_size {list(geo.img_size)}; pick a multiple of the patch"
                )
    if spec.adapt.channels.method == "map":
        cmap = spec.adapt.channels.map or ()
        if len(cmap) != target.in_chans:
            raise SpecError(
                f"{spec.where}.adapt.channels.map: has {len(cmap)} entries, the target has {target.in_chans} channels"
            )
        bad = [c for c in cmap if c is not None and not 0 <= c < source.in_chans]
        if bad:
            raise SpecError(
                f"{spec.where}.adapt.channels.map: source channel {bad[0]} does not exist; the weights have "
                f"{source.in_chans} channels (0..{source.in_chans - 1}), or null for zeros"
            )


# Exceptions a forward raises when the input size does not fit the model (timm's asserts, reshapes, broadcasts).
_SHAPE_ERRORS = (RuntimeError, AssertionError, ValueError, IndexError, TypeError)


def _meta_forward(model: nn.Module, in_chans: int, img_size: Size2) -> Optional[Exception]:
    """Run one forward of a meta-device model on a meta image of ``img_size``: None where it runs, the error where
    it fails on the shapes, and :data:`_UNKNOWN` where the meta device cannot say (an op without a meta kernel, or
    any other error)."""
    x = torch.empty(1, in_chans, *img_size, device="meta")
    was_training = model.training
    try:
        with torch.no_grad(), no_empty_outputs():
            model.eval()(x)
    except NotImplementedError:  # an op with no meta kernel: no answer, not a refusal
        return _UNKNOWN
    except _SHAPE_ERRORS as e:
        return e
    except Exception:  # anything else says nothing about the size
        return _UNKNOWN
    finally:
        model.train(was_training)
    return None


_UNKNOWN = NotImplementedError("the meta device cannot tell")


def _dynamic_meta_model(spec: VariantSpec, family: Family, kwargs: dict[str, Any]) -> nn.Module:
    """The model a dynamic variant runs, on the meta device: built with the family's dynamic arguments and made
    dynamic as :func:`timm_anysize.builder.build_variant` makes it (its run-time path, not timm's fixed-size one)."""
    model = build_meta(spec, {**kwargs, **family.dynamic_kwargs(True, spec.pad)}, "target", family)
    if family.dynamic != "native":
        enable_dynamic(model, pad=spec.pad)
    return model


def _static_model(spec: VariantSpec, family: Family, model: nn.Module, kwargs: dict[str, Any]) -> nn.Module:
    """The model ``dynamic: false`` builds: the plan's own, unless the family's dynamic arguments (said explicitly
    at build time, :attr:`VariantPlan.dynamic_kwargs`) differ from what it was built with."""
    static = family.dynamic_kwargs(False, spec.pad)
    if all(getattr(model, k, v) == v for k, v in static.items()):
        return model
    return build_meta(spec, {**kwargs, **static}, "target", family)


def _sizes_that_run(
    spec: VariantSpec, family: Family, model: nn.Module, kwargs: dict[str, Any], in_chans: int, size: Size2
) -> list[Size2]:
    """Up to two sizes near ``size`` at which timm's own model runs: both sides at the multiples of 16, 32 or 64
    around them, nearest first, at most 10 probed (each a meta build and a meta forward)."""
    near = {
        (a, b) for m in (16, 32, 64) for a in nearest_multiples(size[0], m) for b in nearest_multiples(size[1], m)
    } - {tuple(size)}
    candidates = sorted(near, key=lambda c: (abs(c[0] - size[0]) + abs(c[1] - size[1]), c))
    static = family.dynamic_kwargs(False, spec.pad)
    found: list[Size2] = []
    for cand in candidates[:10]:
        if "img_size" in kwargs:  # timm builds the model for its size, as dynamic: false builds it
            try:
                probe = build_meta(spec, {**kwargs, "img_size": cand, **static}, "probe", family)
            except SpecError:
                continue
        else:
            probe = model
        if _meta_forward(probe, in_chans, cand) is None:
            found.append(cand)
            if len(found) == 2:
                break
    return found


def check_runs_at_own_size(
    spec: VariantSpec,
    family: Family,
    source: tuple[nn.Module, Geometry],
    target: tuple[nn.Module, Geometry],
    kwargs: dict[str, Any],
    dynamic: bool,
) -> None:
    """timm's model at the variant's size must run it: one forward on the meta device (shapes only); refused with
    timm's error and the nearest sizes that run. ``dynamic: false`` checks the model it builds (the family's static
    arguments); a dynamic variant, the model at its own size (an image too small for the stem and strides). Not
    refused where the meta device cannot tell (an op without a meta kernel, or a forward that fails at the weights'
    own size too).

    Example:
        >>> import timm
        >>> from timm_anysize.core.meta import meta_device
        >>> from timm_anysize.core.spec import parse_variant
        >>> from timm_anysize.families import family_of
        >>> from timm_anysize.timm_geometry import geometry_of
        >>> with meta_device():
        ...     source, target = timm.create_model("test_vit"), timm.create_model("test_vit", img_size=8)
        >>> vit = family_of(source)
        >>> spec = parse_variant("v", {"base": "test_vit", "img_size": 8, "dynamic": False})
        >>> check_runs_at_own_size(
        ...     spec, vit, (source, geometry_of(source, vit)), (target, geometry_of(target, vit)), {"img_size": 8}, False
        ... )  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        timm_anysize.core.errors.SpecError: <dict>: v.img_size: dynamic: false builds timm's own vit model at [8, 8], \
which cannot run it: ...; nearest sizes that run: [16, 16], [32, 32]; or leave dynamic on
    """
    (source_model, source_geo), (target_model, target_geo) = source, target
    model = _dynamic_meta_model(spec, family, kwargs) if dynamic else _static_model(spec, family, target_model, kwargs)
    source_sd = source_model.state_dict()
    # A tensor the weights have that comes out empty at this size (LeViT's attention biases of a stage whose
    # resolution rounds to 0): the image is too small for the stages; the meta device would not notice.
    empty = [k for k, v in model.state_dict().items() if v.numel() == 0 and k in source_sd and source_sd[k].numel()]
    error = (
        EmptyOutputError(f"{empty[0]} is empty at this size ({len(empty)} tensors): too small for its stages")
        if empty
        else _meta_forward(model, target_geo.in_chans, target_geo.img_size)
    )
    if error is None or error is _UNKNOWN:
        return
    if _meta_forward(source_model, source_geo.in_chans, source_geo.img_size) is not None:
        return  # the forward fails at the weights' own size too: the meta device cannot judge this model
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    near = _sizes_that_run(spec, family, model, kwargs, target_geo.in_chans, target_geo.img_size)
    sizes = f"nearest sizes that run: {', '.join(str(list(s)) for s in near)}; " if near else ""
    if dynamic:
        raise SpecError(
            f"{spec.where}.img_size: timm's {family.name} model cannot run at the variant's own size "
            f"{list(target_geo.img_size)}: {first}; {sizes}pick another img_size"
        )
    raise SpecError(
        f"{spec.where}.img_size: dynamic: false builds timm's own {family.name} model at "
        f"{list(target_geo.img_size)}, which cannot run it: {first}; {sizes}"
        + ("or leave dynamic on" if family.supports_dynamic else "pick another img_size")
    )


def refuse_geometry_bound(plan: VariantPlan, target_shapes: dict[str, tuple[int, ...]]) -> None:
    """An architecture without a family row: every tensor other than the first layer's kernel (input channels
    only) and the classifier (a new ``num_classes``) must keep its shape, or the plan is refused naming them."""

    s, t, source_shapes = plan.source, plan.target, plan.source_shapes
    heads = set(plan.classifier_keys) if s.num_classes != t.num_classes else set()
    bad = []
    for key in [*target_shapes, *(k for k in source_shapes if k not in target_shapes)]:
        a, b = source_shapes.get(key), target_shapes.get(key)
        if a == b or key in heads:
            continue
        if key in plan.patch_keys and a is not None and b is not None and len(a) == len(b) == 4:
            if (a[0], *a[2:]) == (b[0], *b[2:]) and (a[1], b[1]) == (s.in_chans, t.in_chans):
                continue  # input channels adapted (adapt_input_conv)
        bad.append(key)
    if bad:
        shapes = "; ".join(f"{k}: {source_shapes.get(k)} -> {target_shapes.get(k)}" for k in bad[:3])
        raise AdaptationError(
            f"{plan.spec.where}: {plan.spec.arch} ({_type_name(plan)}, no family row) has tensors whose shape "
            f"depends on the geometry ({s.compact()} -> {t.compact()}): {summarize_keys(bad)} ({shapes}). Without "
            f"a row timm-anysize only adapts the first layer's input channels and the classifier: keep the geometry "
            f"the weights have (pretrained.img_size / in_chans), or add a family row that says how to resample them"
        )


def _type_name(plan: VariantPlan) -> str:
    """The model class a plan builds."""
    return plan.family.classes[0].__name__ if plan.family.classes else plan.spec.arch
