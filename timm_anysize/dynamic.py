"""Run-time dynamic input size: any H x W in one model instance, with what each size needs computed once and cached.

This is the shared machinery; each family's run-time code (its dynamic subclass, the tables it caches) lives in its
module of :mod:`timm_anysize.families`, and its row's :class:`~timm_anysize.core.family.DynamicPath` says how
:func:`enable_dynamic` sets it up. What is decided here (interpolation, antialias, compat, padding, cache size)
reaches the family's code as one :class:`~timm_anysize.core.runtime_options.RuntimeOptions`. Caches are stamped by the weights they derive from (:mod:`timm_anysize.core.cache`):
any change of the weights (``load_state_dict``, an optimizer step, ``.to()``) invalidates them; when a gradient can
flow, or while scripting, tracing, compiling or exporting, the resampling runs inline.
"""

from typing import Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import Format, PatchEmbed, nchw_to
from timm.layers.helpers import is_exporting
from torch.utils.hooks import RemovableHandle

from timm_anysize.core.attributes import size_attr
from timm_anysize.core.cache import DEFAULT_CACHE_SIZE, symbolic, traced
from timm_anysize.core.compat import compat_preset
from timm_anysize.core.errors import AnysizeError, UnsupportedModelError
from timm_anysize.core.family import DynamicPath, Family
from timm_anysize.core.input_size import guard_input_size
from timm_anysize.core.padding import check_multiple, pad_to_multiple
from timm_anysize.core.runtime_options import (
    RuntimeOptions,
    cache_for,
    runtime_caches,
    runtime_options,
    set_runtime_options,
)
from timm_anysize.families import FAMILIES

__all__ = [
    "enable_dynamic",
    "is_dynamic",
    "clear_dynamic_cache",
    "dynamic_cache_info",
    "DynamicPatchEmbed",
    "guard_run_time_size",
]


class DynamicPatchEmbed(PatchEmbed):
    """timm's PatchEmbed (padding on: ``dynamic_img_pad``) that skips ``F.pad`` when there is nothing to pad.

    timm pads unconditionally with ``dynamic_img_pad``, and a zero-size pad still copies the whole input
    (about 0.5% of a ViT-Ti forward at batch 32). While scripting, tracing, compiling or exporting, it pads as timm
    does so the graph stays free of shape branches (TorchScript has no ``super()``: timm's steps are spelled out).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_img_pad and (torch.jit.is_scripting() or self._must_pad(x)):
            x = pad_to_multiple(x, [self.patch_size[0], self.patch_size[1]], True)
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # NCHW -> NLC
        elif self.output_fmt != Format.NCHW:
            x = nchw_to(x, self.output_fmt)
        return self.norm(x)

    @torch.jit.unused
    def _must_pad(self, x: torch.Tensor) -> bool:
        """Eager: whether the input is not whole patches; traced: always (no shape branch)."""
        if symbolic(x) or traced():
            return True
        return bool(x.shape[-2] % self.patch_size[0] or x.shape[-1] % self.patch_size[1])


def _runtimes() -> list[DynamicPath]:
    return [fam.runtime for fam in FAMILIES if fam.runtime is not None]


def _dynamic_class(cls: type) -> Optional[tuple[type, DynamicPath]]:
    """The dynamic class for a timm model class (or a class that already is one) and its family's path."""
    for runtime in _runtimes():
        for timm_cls, dynamic_cls in runtime.classes.items():
            if cls is timm_cls or cls is dynamic_cls:
                return dynamic_cls, runtime
    return None


def _check_divisible(module: nn.Module, args: tuple) -> None:
    if not (torch.compiler.is_compiling() or is_exporting()):
        check_multiple(args[0].shape[-2:], size_attr(module, "patch_size"))


def mark_native_dynamic(model: nn.Module) -> None:
    """Mark ``model`` as running at any size through timm's own path (a native family, built with timm's dynamic
    constructor arguments): :func:`is_dynamic` is true for it."""
    setattr(model, "_anysize_native_dynamic", True)


def is_dynamic(model: nn.Module) -> bool:
    """True if ``model`` runs at any input size through :func:`enable_dynamic`."""
    if getattr(model, "_anysize_native_dynamic", False):  # a family that runs at any size through timm's own path
        return True
    dynamic_type = any(
        type(model) in r.classes.values() or (r.claims is not None and r.claims(model)) for r in _runtimes()
    )
    has_options = runtime_options(model) is not None
    return dynamic_type and has_options and bool(getattr(model, "dynamic_img_size", False))


def enable_dynamic(
    model: nn.Module,
    pad: bool = True,
    interpolation: str = "bicubic",
    antialias: bool = True,
    cache_size: int = DEFAULT_CACHE_SIZE,
    compat: str = "timm",
) -> nn.Module:
    """Make a timm model accept any input H x W, in place, with what each size needs computed once and cached.

    Works on any supported timm model, whether or not it was built by timm-anysize: ViT (incl. registers and
    ``no_embed_class``), distilled DeiT, EVA, CaiT, PiT, VOLO, CrossViT and Hiera (position embedding resampled per
    grid), BEiT (bias tables per grid, :mod:`timm_anysize.families.beit`), LeViT (biases per stage resolution,
    :mod:`timm_anysize.families.levit`), MViTv2 (relative-position axes per feature size,
    :mod:`timm_anysize.families.mvitv2`), and Swin, SwinV2, SwinV2-CR (exact masks over padded windows,
    :mod:`timm_anysize.families.swin`; also a Swin ``features_only`` wrapper). At the model's own size the outputs are
    bit-identical to before; at other sizes they equal a model built for that size with the same resampling
    (Swin: where no padding is needed).

    Args:
        model: The model; changed in place (its class becomes a subclass with the cached path).
        pad: Pad inputs that are not a multiple of the patch (bottom/right, as timm's ``dynamic_img_pad``); when
            False such inputs raise :class:`~timm_anysize.core.errors.InputNotDivisibleError` (a ``ValueError``)
            naming the size, the multiple and the nearest sizes that work.
        interpolation: Resampling mode of the position embedding (``set_input_size`` uses bicubic).
        antialias: Anti-alias when the grid shrinks.
        cache_size: Grids kept in the LRU cache.
        compat: Resample as this library does instead (``adapt.pos_embed.compat``:
            :mod:`timm_anysize.core.compat`): token position embeddings, and BEiT's bias tables for
            ``transformers``; it fixes the interpolation, so ``interpolation`` / ``antialias`` are not read.

    Returns:
        The same model.

    Raises:
        TypeError: The model's class is not supported.

    Example:
        >>> import timm, torch
        >>> m = enable_dynamic(timm.create_model("test_vit").eval())
        >>> m(torch.randn(1, 3, 96, 130)).shape
        torch.Size([1, 1000])
    """
    compat_preset(compat)  # an unknown name fails here, naming the presets
    options = RuntimeOptions(interpolation, antialias, pad, compat, cache_size)
    cls = type(model)
    for handle in getattr(model, "_anysize_pad_hooks", ()):
        handle.remove()
    pad_hooks: list[RemovableHandle] = []
    setattr(model, "_anysize_pad_hooks", pad_hooks)
    for runtime in _runtimes():  # a family with its own enabler (Swin: its blocks, also in a feature wrapper)
        if runtime.enable is not None and runtime.claims is not None and runtime.claims(model):
            set_runtime_options(model, options)
            runtime.enable(model, pad)
            if not pad:
                pad_hooks.append(model.get_submodule("patch_embed").register_forward_pre_hook(_check_divisible))
            return model
    found = _dynamic_class(cls)
    if found is None:
        names = ", ".join(
            sorted(
                {c.__name__ for r in _runtimes() for c in r.classes}
                | {f.classes[0].__name__ for f in FAMILIES if f.runtime is not None and f.runtime.enable is not None}
            )
        )
        raise UnsupportedModelError(f"enable_dynamic: {cls.__name__} is not supported (supported: {names})")
    dynamic_cls, runtime = found
    rope = getattr(model, "rope", None)
    if rope is not None and getattr(rope, "feat_shape", None) is not None:
        raise UnsupportedModelError(
            f"enable_dynamic: this {cls.__name__} was built with RoPE for a fixed {tuple(rope.feat_shape)} grid; "
            f"create it with timm.create_model(..., dynamic_img_size=True), then call enable_dynamic"
        )
    model.__class__ = dynamic_cls
    setattr(model, "dynamic_img_size", True)  # timm's flags are plain attributes (bools, a Format) of its modules
    set_runtime_options(model, options)  # what the family's run-time code reads (core.runtime_options)
    cache_for(model, "pos_embed")  # made now: dynamic_cache_info reports it before the first forward
    if runtime.setup is not None:
        runtime.setup(model, options)
    if runtime.patch_layout == "none":  # a stem that takes any size (Hiera pads to whole mask units itself)
        return model
    pe = model.get_submodule("patch_embed")
    setattr(pe, "strict_img_size", False)
    if runtime.patch_layout == "nhwc":
        setattr(pe, "flatten", False)
        setattr(pe, "output_fmt", Format.NHWC)
    setattr(pe, "dynamic_img_pad", pad)
    if type(pe) is PatchEmbed:
        pe.__class__ = DynamicPatchEmbed
    if not pad:
        pad_hooks.append(pe.register_forward_pre_hook(_check_divisible))
    return model


def guard_run_time_size(
    model: nn.Module, family: Family, own: Sequence[int], pad: bool, first_conv: str = "", fixed: bool = False
) -> nn.Module:
    """Check each run-time input size before any layer runs, in place (:mod:`timm_anysize.core.input_size`): an
    input below the smallest the model's stem and strides take, off its stem's multiple (``Family.stem_multiple``;
    padded instead where the family's stem pads and ``pad``), or, ``fixed``, any size but ``own`` raises
    :class:`~timm_anysize.InputSizeError` naming the nearest sizes that work.

    Args:
        model: The model (dynamic, or built for ``own`` only).
        family: Its family row.
        own: The size it was built for.
        pad: The variant pads (``pad: true``).
        first_conv: The first layer the input meets (where the check goes; "": the model).
        fixed: It runs at ``own`` only (``dynamic: false``).

    Returns:
        The same model; :func:`timm_anysize.input_limits` reads what it runs at.

    Example:
        >>> import timm
        >>> from timm_anysize.families import family_of
        >>> m = enable_dynamic(timm.create_model("pit_ti_224").eval())
        >>> m = guard_run_time_size(m, family_of(m), (224, 224), pad=True, first_conv="patch_embed.conv")
        >>> m(torch.zeros(1, 3, 9, 9))
        Traceback (most recent call last):
        ...
        timm_anysize.core.errors.InputSizeError: input 9x9 is smaller than the smallest input this model runs at, \
16x16 (its stem and strides); nearest sizes that work: 16x16; resize or pad the image to at least 16x16
    """
    if fixed:
        return guard_input_size(model, own, fixed=True, first_conv=first_conv)
    what = f"{family.name}'s {'space-to-depth block' if family.space_to_depth else 'patch'}"
    if not family.whole_patches:
        what = f"{family.name}'s stem and stage patches"
    multiple = family.stem_multiple(model, pad)
    return guard_input_size(model, own, multiple, pad=pad and family.stem_pad, what=what, first_conv=first_conv)


def clear_dynamic_cache(model: nn.Module) -> None:
    """Drop the cached position embeddings and bias tables (needed only after writing weights through ``.data``)."""
    for module in model.modules():
        for cache in runtime_caches(module):
            cache.clear()


def dynamic_cache_info(model: nn.Module) -> dict[str, int]:
    """Hits, misses, invalidations and size of the model's position-embedding cache.

    Example:
        >>> import timm, torch
        >>> m = enable_dynamic(timm.create_model("test_vit").eval())
        >>> with torch.no_grad():
        ...     _ = m(torch.randn(1, 3, 64, 64)); _ = m(torch.randn(1, 3, 64, 64))
        >>> dynamic_cache_info(m)["hits"]
        1
    """
    cache = cache_for(model, "pos_embed", make=False)
    if cache is None:
        raise AnysizeError(f"{type(model).__name__} is not dynamic; call enable_dynamic(model) first")
    return cache.info()
