"""Checkpoints saved by other libraries, mapped onto timm's names: one module per origin, detected from the keys.

Each origin module (:mod:`.torchvision`, :mod:`.transformers`, :mod:`.mmpretrain`, :mod:`.dino`, ...) declares
its :class:`~.mapping.Layout` s: a key mapping plus the few tensor transforms it needs. The modules are discovered,
like the families: adding an origin is one new module here that defines ``LAYOUTS`` (``mapping`` is their shared
engine). :func:`read_layout` strips the training wrappers (``state_dict`` / ``model`` / ``teacher`` / ``student`` /
``module.``), finds the one layout the keys fit, and converts; the :class:`~.mapping.Conversion` says where each timm
tensor came from and why each other source tensor was dropped, and ends up in the variant's adaptation report.
:func:`check_conversion` then refuses what the variant cannot reproduce (:class:`ConversionCheck`: what it is
checked against).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Mapping, NamedTuple, Optional

import torch

from timm_anysize.core.errors import WeightsError
from timm_anysize.core.report import summarize_keys
from timm_anysize.core.spec import SELECT, as_pair, register_layout_names
from timm_anysize.origins.mapping import Conversion, Layout

__all__ = [
    "LAYOUTS",
    "ORIGINS",
    "ORIGIN_MODULES",
    "Conversion",
    "ConversionCheck",
    "CheckpointLayout",
    "Layout",
    "check_conversion",
    "detect_layout",
    "get_layout",
    "read_layout",
    "unwrap_checkpoint",
    "unwrap_state_dict",
    "config_geometry",
    "reads_transformers_config",
    "model_numerics",
]


def _origin_modules() -> tuple[ModuleType, ...]:
    """Every module of this package that declares ``LAYOUTS``, in name order (``mapping`` and ``_*`` modules are
    shared code, not origins)."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    modules = [importlib.import_module(f"{__name__}.{name}") for name in names]
    return tuple(m for m in modules if hasattr(m, "LAYOUTS"))


# Discovered, in module-name order: the order detect_layout tries them and error messages list them.
ORIGIN_MODULES = _origin_modules()

LAYOUTS: dict[str, Layout] = {layout.name: layout for module in ORIGIN_MODULES for layout in module.LAYOUTS}
# What pretrained.layout accepts: auto, timm, an origin (any of its layouts) or one layout by its full name.
ORIGINS = ("auto", "timm", *dict.fromkeys(layout.origin for layout in LAYOUTS.values()), *LAYOUTS)
register_layout_names(ORIGINS)


def get_layout(name: str) -> Layout:
    """The layout called ``name`` (``torchvision.vit``, ...).

    Example:
        >>> get_layout("torchvision.vit").families
        ('vit',)
    """
    if name not in LAYOUTS:
        raise WeightsError(f"unknown checkpoint layout {name!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def _strip(state_dict: dict[str, torch.Tensor], prefix: str) -> Optional[dict[str, torch.Tensor]]:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return None


def unwrap_state_dict(obj: Any, where: str = "checkpoint") -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a checkpoint in timm's own layout (``state_dict``/``model`` wrappers, DDP's ``module.``
    prefix), and the wrappers removed to reach them.

    Raises:
        WeightsError: It holds no state dict, or entries that are not tensors; names ``where`` and the entries.

    Example:
        >>> import torch
        >>> sd, how = unwrap_state_dict({"state_dict": {"module.w": torch.ones(1)}})
        >>> list(sd), how
        (['w'], ["'state_dict' entry", "'module.' prefix (DistributedDataParallel)"])
    """
    wrappers: list[str] = []
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            wrappers.append(f"{key!r} entry")
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{where}: holds {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{where}: entries that are not tensors: {', '.join(map(str, bad[:5]))}; save a state dict")
    stripped = _strip(obj, "module.")
    if stripped is not None:
        return stripped, [*wrappers, "'module.' prefix (DistributedDataParallel)"]
    return obj, wrappers


def unwrap_checkpoint(obj: Any, select: str = "teacher", where: str = "checkpoint") -> tuple[dict, list[str]]:
    """The tensors inside a training checkpoint, and the wrappers that were removed to reach them.

    Handles ``{'state_dict': ..., 'meta': ...}`` (MMPretrain), ``{'model': ...}`` (torchvision references, DeiT),
    DINO's ``{'teacher': ..., 'student': ...}`` and DINOv2's ``teacher.`` / ``student.`` prefixes (``select``
    picks one), and DDP's ``module.`` prefix.

    Raises:
        WeightsError: ``select`` names a model the checkpoint does not hold, or no tensors are found.

    Example:
        >>> import torch
        >>> sd, how = unwrap_checkpoint({"teacher": {"backbone.w": torch.ones(1)}, "student": {}, "epoch": 3})
        >>> list(sd), how
        (['backbone.w'], ["'teacher' of a teacher/student checkpoint (select: teacher)"])
    """
    if select not in SELECT:
        raise WeightsError(f"{where}: pretrained.select must be one of {', '.join(SELECT)}, got {select!r}")
    wrappers: list[str] = []
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        if "teacher" in obj or "student" in obj:
            if not isinstance(obj.get(select), dict):
                raise WeightsError(
                    f"{where}: a teacher/student checkpoint without a {select!r} entry "
                    f"(has {', '.join(map(str, obj))}); set pretrained.select"
                )
            obj = obj[select]
            wrappers.append(f"{select!r} of a teacher/student checkpoint (select: {select})")
            continue
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                others = [str(k) for k in obj if k != key]
                obj = obj[key]
                wrappers.append(f"{key!r} entry" + (f" (ignored: {', '.join(others[:6])})" if others else ""))
                break
        else:
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{where}: no state dict of tensors found (after unwrapping {wrappers or 'nothing'})")
    sd = dict(obj)
    for _ in range(2):
        stripped = _strip(sd, "module.")
        if stripped is not None:
            sd = stripped
            wrappers.append("'module.' prefix (DistributedDataParallel)")
        roles = {k.split(".", 1)[0] for k in sd}
        if roles <= set(SELECT) and len(roles) >= 1 and all("." in k for k in sd):
            if select not in roles:
                raise WeightsError(
                    f"{where}: keys are prefixed {sorted(roles)}, none with {select!r}; set pretrained.select"
                )
            dropped = len([k for k in sd if not k.startswith(select + ".")])
            sd = {k[len(select) + 1 :]: v for k, v in sd.items() if k.startswith(select + ".")}
            wrappers.append(f"'{select}.' prefix (select: {select}; {dropped} other tensors not read)")
    return sd, wrappers


def _candidates(origin: str) -> list[Layout]:
    if origin == "auto":
        return list(LAYOUTS.values())
    if origin in LAYOUTS:
        return [LAYOUTS[origin]]
    found = [layout for layout in LAYOUTS.values() if layout.origin == origin]
    if not found:
        raise WeightsError(f"unknown pretrained.layout {origin!r}; choose one of {', '.join(ORIGINS)}")
    return found


def _describe(conv: Conversion) -> str:

    parts = []
    if conv.missing:
        parts.append(f"missing: {summarize_keys(conv.missing, 8)}")
    if conv.unexpected:
        parts.append(f"unexpected: {summarize_keys(conv.unexpected, 8)}")
    return "; ".join(parts) or "fits"


def detect_layout(
    state_dict: dict[str, torch.Tensor],
    origin: str = "auto",
    where: str = "checkpoint",
    config: Optional[dict] = None,
) -> Optional[Conversion]:
    """Find the layout ``state_dict`` is in and convert it; None when ``origin`` is ``auto`` and no foreign layout
    applies (the checkpoint is then read as timm's own layout, through timm's checkpoint filters).

    Args:
        state_dict: Unwrapped source tensors.
        origin: ``auto``, an origin (``torchvision``) or one layout (``torchvision.vit``).
        where: The file, for messages.
        config: The transformers ``config.json`` next to the weights, if any (geometry, eps, activation).

    Raises:
        WeightsError: Several layouts fit (ambiguous), or an origin was named and none of its layouts fits; the
            message lists the layouts tried and the closest one with its missing and unexpected keys.

    Example:
        >>> import torchvision, torch
        >>> sd = torchvision.models.VisionTransformer(32, 8, 1, 2, 16, 32).state_dict()
        >>> detect_layout(sd).layout
        'torchvision.vit'
    """
    if origin == "timm":
        return None
    keys = list(state_dict)
    tried = _candidates(origin)
    convs = {layout.name: layout.convert(state_dict, config) for layout in tried if layout.applies(keys)}
    fits = [c for c in convs.values() if not c.missing and not c.unexpected]
    if len(fits) == 1:
        return fits[0]
    if len(fits) > 1:
        raise WeightsError(
            f"{where}: the keys fit several layouts ({', '.join(c.layout for c in fits)}); name one "
            f"with pretrained.layout"
        )
    if origin == "auto" and not convs:
        return None
    # The closest: the layout that explains the most keys.
    scored = convs or {layout.name: layout.convert(state_dict) for layout in tried}
    best = min(scored.values(), key=lambda c: len(c.unexpected) + len(c.missing))
    raise WeightsError(
        f"{where}: no known layout fits the checkpoint's {len(keys)} keys (tried: {', '.join(t.name for t in tried)}"
        f"); closest: {best.layout} ({_describe(best)}). Set pretrained.layout to the library it was saved by "
        f"(one of {', '.join(ORIGINS)}), or convert it to timm's names"
    )


class CheckpointLayout(NamedTuple):
    """A loaded checkpoint in timm's names: what :func:`read_layout` found."""

    state_dict: dict[str, torch.Tensor]  # timm's names (converted where another library's layout was found)
    wrappers: list[str]  # the containers and prefixes removed to reach the tensors
    conversion: Optional[Conversion]  # how it was converted; None for timm's own layout


def read_layout(
    obj: Any, layout: str = "auto", select: str = "teacher", where: str = "checkpoint", config: Optional[dict] = None
) -> CheckpointLayout:
    """Unwrap a loaded checkpoint and, unless it is in timm's own layout, convert it to timm's names: the one place
    that decides how a checkpoint is read, for loading, ``convert`` and ``show`` alike.

    Args:
        obj: The checkpoint as saved (:func:`timm_anysize.weight_files.read_checkpoint`).
        layout: ``pretrained.layout``: ``auto`` (detected from the keys), ``timm``, an origin or one layout.
        select: ``pretrained.select``: the model of a teacher/student checkpoint.
        where: The file, for messages.
        config: The transformers ``config.json`` that speaks for the weights, if any.

    Raises:
        WeightsError: No state dict of tensors; ambiguous or unknown layout (see :func:`detect_layout`).

    Example:
        >>> import torchvision
        >>> m = torchvision.models.VisionTransformer(32, 8, 1, 2, 16, 32)
        >>> found = read_layout({"model": m.state_dict(), "epoch": 3})
        >>> found.conversion.layout, found.conversion.origin["cls_token"], found.wrappers
        ('torchvision.vit', "torchvision 'class_token'", ["'model' entry (ignored: epoch)"])
    """
    if layout == "timm":
        return CheckpointLayout(*unwrap_state_dict(obj, where), None)
    try:
        state_dict, wrappers = unwrap_checkpoint(obj, select, where)
    except WeightsError:
        if layout != "auto":
            raise
        # not a foreign checkpoint either: timm's reader says why
        return CheckpointLayout(*unwrap_state_dict(obj, where), None)
    conv = detect_layout(state_dict, layout, where, config)
    if conv is None:
        return CheckpointLayout(state_dict, wrappers, None)
    conv.wrappers = wrappers
    return CheckpointLayout(conv.state_dict, wrappers, conv)


def config_geometry(config: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """The source geometry a transformers ``config.json`` states, as ``pretrained`` fields (those it states).

    Example:
        >>> config_geometry({"model_type": "vit", "image_size": 384, "patch_size": 16, "num_channels": 3})
        {'img_size': (384, 384), 'patch_size': (16, 16), 'in_chans': 3}
    """
    config = config or {}
    out: dict[str, Any] = {}
    for field, key in (("image_size", "img_size"), ("patch_size", "patch_size")):
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
            continue  # absent or not a size: nothing to fill in or check
        size = as_pair(value)
        if len(size) == 2 and all(isinstance(x, int) for x in size):
            out[key] = size
    chans = config.get("num_channels")
    if isinstance(chans, int) and not isinstance(chans, bool) and chans > 0:
        out["in_chans"] = chans
    return out


def reads_transformers_config(layout: str) -> bool:
    """Whether a ``pretrained.layout`` lets a transformers ``config.json`` beside the weights speak for them.

    Example:
        >>> reads_transformers_config("auto"), reads_transformers_config("transformers.vit"), reads_transformers_config("timm")
        (True, True, False)
    """
    return layout in ("auto", "transformers") or layout.startswith("transformers.")


# transformers' activation names -> the timm activation computing the same function
_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def _act_name(module: torch.nn.Module) -> str:
    approx = getattr(module, "approximate", "none")
    return "gelu_tanh" if approx == "tanh" or "Tanh" in type(module).__name__ else "gelu"


def model_numerics(model: torch.nn.Module) -> dict[str, tuple]:
    """What a timm model computes that an origin's config may state otherwise: its GELU approximations
    (``gelu`` / ``gelu_tanh``) and its LayerNorm eps values. The plan records them off the source model it builds.

    Example:
        >>> import timm
        >>> model_numerics(timm.create_model("test_vit"))
        {'activations': ('gelu',), 'layer_norm_eps': (1e-06,)}
    """
    acts = {_act_name(m) for m in model.modules() if "GELU" in type(m).__name__.upper()}
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    return {"activations": tuple(sorted(acts)), "layer_norm_eps": tuple(sorted(eps))}


@dataclass(frozen=True)
class ConversionCheck:
    """What a checkpoint converted from another library is checked against: the variant's models, as its plan
    resolved them (the pipeline makes one from the plan; :func:`check_conversion` reads nothing else)."""

    variant: str  # the variant, for messages (``configs/x.yaml: name``)
    arch: str  # the base architecture
    family: str  # the base's family
    source_kwargs: Mapping[str, Any]  # what the model at the weights' geometry is built with
    target_kwargs: Mapping[str, Any]  # what the variant's model is built with
    source_numerics: Mapping[str, tuple]  # model_numerics of the source model
    img_size: Optional[tuple[int, int]]  # the source geometry
    patch_size: Optional[tuple[int, int]]
    in_chans: int
    num_classes: int  # of the source head
    target_num_classes: int  # of the variant's head
    config: Optional[dict[str, Any]] = None  # the transformers config.json that speaks for the weights


def _check_numerics(conv: Conversion, numerics: Mapping[str, tuple], name: str) -> None:
    """LayerNorm eps and activation of the origin against the timm model the variant builds (``numerics``, read off
    the source model when the plan was made)."""

    act = conv.numerics.get("hidden_act")
    if act is not None:
        want = _ACTS.get(act)
        used = set(numerics["activations"])
        if want is None:
            raise WeightsError(
                f"{name}: {conv.layout} weights use the activation {act!r}, which timm-anysize does "
                f"not map to a timm activation; use another checkpoint or convert it yourself"
            )
        if used and used != {want}:
            raise WeightsError(
                f"{name}: {conv.layout} weights use {act!r} ({want}), the timm model computes "
                f"{'/'.join(sorted(used))}; add `act_layer: {want}` to model_args (and "
                f"pretrained.model_args)"
            )
    eps = conv.numerics.get("layer_norm_eps")
    if eps is not None:
        ours = list(numerics["layer_norm_eps"])
        if ours and ours != [eps]:
            conv.notes.append(
                f"LayerNorm eps {eps:g} in the origin, {'/'.join(f'{e:g}' for e in ours)} in timm's model (timm's "
                f"ViT constructors take no eps argument): outputs differ by about that much relative to the "
                f"activations' variance"
            )


def check_conversion(conv: Conversion, check: ConversionCheck, where: str) -> None:
    """Refuse a converted checkpoint the variant cannot reproduce: another family, numerics the variant's
    ``model_args`` do not carry, a ``config.json`` geometry other than the variant's source geometry, or a
    classifier that cannot be kept.

    Raises:
        WeightsError: Naming the difference and the fix.

    Example:
        >>> import torchvision
        >>> conv = detect_layout(torchvision.models.VisionTransformer(32, 8, 1, 2, 16, 32).state_dict())
        >>> check = ConversionCheck("v", "swin_tiny_patch4_window7_224", "swin", {}, {}, {}, (32, 32), (8, 8), 3,
        ...                         1000, 1000)
        >>> check_conversion(conv, check, "w.pth")
        Traceback (most recent call last):
        ...
        timm_anysize.core.errors.WeightsError: v: w.pth is a torchvision.vit checkpoint (timm family vit), but base swin_tiny_patch4_window7_224 is of family swin; pick a base of that family
    """
    layout, name = get_layout(conv.layout), check.variant
    if check.family not in layout.families:
        raise WeightsError(
            f"{name}: {where} is a {layout.name} checkpoint (timm family {'/'.join(layout.families)})"
            f", but base {check.arch} is of family {check.family}; pick a base of that family"
        )
    for key, want in conv.model_args.items():
        for what, kwargs in (("pretrained.model_args", check.source_kwargs), ("model_args", check.target_kwargs)):
            if kwargs.get(key) != want:
                raise WeightsError(
                    f"{name}: {layout.name} weights compute with {key}={want!r} (timm's {check.arch} default "
                    f"differs); add `{key}: {want!r}` to {what} so the variant computes what the origin did"
                )
    if conv.numerics:
        _check_numerics(conv, check.source_numerics, name)
    if check.config:
        stated = config_geometry(check.config)  # the fields with_config_geometry fills in
        for key, field, ours in (
            ("img_size", "image_size", check.img_size),
            ("patch_size", "patch_size", check.patch_size),
        ):
            theirs = stated.get(key)
            if theirs is not None and ours is not None and tuple(ours) != theirs:
                raise WeightsError(
                    f"{name}: config.json beside {where} says {field} {list(theirs)}, the variant's source geometry "
                    f"is {list(ours)}; set pretrained.{key}: {list(theirs)}, or leave it out and config.json fills "
                    f"it in"
                )
        if stated.get("in_chans") not in (None, check.in_chans):
            raise WeightsError(
                f"{name}: config.json beside {where} says num_channels {stated['in_chans']}, the "
                f"variant's source has {check.in_chans}; set pretrained.in_chans: {stated['in_chans']}"
            )
    if conv.head_unusable and check.target_num_classes and check.num_classes == check.target_num_classes:
        raise WeightsError(
            f"{name}: {conv.head_unusable}; give the variant a new head (num_classes other than "
            f"{check.num_classes}) or none (num_classes: 0)"
        )


def layout_hint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """One line for a "keys do not fit" error: the layouts tried and the closest, with what it lacks.

    Example:
        >>> import torch
        >>> layout_hint({"conv_proj.weight": torch.ones(1)}).startswith("checkpoint layouts tried:")
        True
    """
    convs = [layout.convert(state_dict) for layout in LAYOUTS.values()]
    best = min(convs, key=lambda c: len(c.unexpected) + len(c.missing) + (0 if c.state_dict else 10**9))
    return (
        f"checkpoint layouts tried: timm, {', '.join(LAYOUTS)}; closest other than timm: {best.layout} "
        f"({_describe(best)}); name the library in pretrained.layout if it saved the weights"
    )
