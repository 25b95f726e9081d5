"""The machinery of a run-time patch size (FlexiViT) that family modules build on: which patch size a call runs at,
the cache of the PI-resized kernel, and the mixin that gives a convolutional patch embedding a forward at that size.

The public API (``patch_size``, ``set_patch_size``, ``enable_flexi``, ...) is :mod:`timm_anysize.flexi`. A family
whose patch embedding is not a convolution followed by timm's ``PatchEmbed`` layout says so in its
:class:`~timm_anysize.core.family.Family` row: ``flexi_mixin`` (a subclass of :class:`FlexiPatchEmbedMixin` with its
own layout after the projection) or ``flexi_embed`` (its own flexi embedding, a subclass of :class:`FlexiEmbed`).
"""

from __future__ import annotations

import contextvars
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Format, resample_patch_embed
from timm.layers.format import nchw_to

from timm_anysize.core.cache import DEFAULT_CACHE_SIZE, PosEmbedCache, cached_or_inline
from timm_anysize.core.padding import check_multiple, pad_to_multiple
from timm_anysize.core.runtime_options import runtime_options

__all__ = ["ACTIVE", "FlexiEmbed", "FlexiPatchEmbedMixin", "make_flexi", "set_kernel_resampling", "Size2"]

Size2 = tuple[int, int]

# Patch embedding (by id) -> patch size, for the calls in this context (thread / asyncio task).
ACTIVE: contextvars.ContextVar[dict[int, Size2]] = contextvars.ContextVar(
    "anysize_patch_size",
    default={},  # noqa: B039  (never mutated: each change sets a new dict)
)


class FlexiEmbed:
    """Base of every flexi patch embedding: the patch size of the call and the cache of its resized kernel
    (:meth:`FlexiEmbed.kernel_cache`, through :func:`timm_anysize.core.cache.cached_or_inline`).

    The patch size, first match wins: the call's context (:data:`ACTIVE`, set by ``timm_anysize.patch_size`` and the
    training draws), the sticky one (``_anysize_sticky``, ``set_patch_size``), the module's own ``patch_size``.
    """

    _anysize_kernel_cache: PosEmbedCache
    _anysize_sticky: Optional[Size2]
    _anysize_resample: tuple[str, bool]

    def active_patch_size(self) -> Size2:
        """The patch size this call runs at."""
        own = tuple(self.patch_size)  # type: ignore[attr-defined]
        p = ACTIVE.get().get(id(self))
        if p is None:
            p = self._anysize_sticky
        return own if p is None else p  # type: ignore[return-value]

    def kernel_cache(self) -> PosEmbedCache:
        """The cache of the resized kernel (one entry per patch size)."""
        return self._anysize_kernel_cache

    def kernel_resampling(self) -> tuple[str, bool]:
        """The interpolation and antialias of the kernel's resize (:func:`set_kernel_resampling`)."""
        return self._anysize_resample


class FlexiPatchEmbedMixin(FlexiEmbed):
    """Forward of a convolutional patch embedding (``proj``, a 4-D kernel) at the patch size of the call, with the
    stored kernel PI-resized (cached); at the module's own patch size, its own forward."""

    def dynamic_feat_size(self, img_size: Sequence[int]) -> Size2:
        """The patch grid of an input at the active patch size (BEiT and CaiT ask before embedding)."""
        ph, pw = self.active_patch_size()
        if self._anysize_pads():
            return -(-int(img_size[0]) // ph), -(-int(img_size[1]) // pw)
        return int(img_size[0]) // ph, int(img_size[1]) // pw

    def feat_ratio(self, as_scalar: bool = True):
        p = self.active_patch_size()
        return max(p) if as_scalar else p

    def _anysize_pads(self) -> bool:
        if hasattr(self, "dynamic_img_pad"):  # timm's PatchEmbed: enable_dynamic(pad=...) sets it
            return bool(self.dynamic_img_pad)
        options = runtime_options(self)  # a family's own patch embedding: the model's pad option
        return options is not None and options.pad

    def kernel(self, p: Size2) -> torch.Tensor:
        """The stored kernel PI-resized to ``p`` (cached while no gradient can flow to it)."""
        weight = self.proj.weight  # type: ignore[attr-defined]
        interpolation, antialias = self.kernel_resampling()
        return cached_or_inline(
            self.kernel_cache(),
            (p,),
            weight,
            lambda: resample_patch_embed(weight, list(p), interpolation=interpolation, antialias=antialias),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.active_patch_size()
        if p == tuple(self.patch_size):  # type: ignore[attr-defined]
            return super().forward(x)  # type: ignore[misc]
        H, W = x.shape[-2:]
        if H % p[0] or W % p[1]:  # the size is looked at only here, as timm's PatchEmbed does
            if not self._anysize_pads():
                check_multiple((H, W), p)
            x = pad_to_multiple(x, [p[0], p[1]])
        x = F.conv2d(x, self.kernel(p), self.proj.bias, stride=p)  # type: ignore[attr-defined]
        return self._anysize_layout(x)

    def _anysize_layout(self, x: torch.Tensor) -> torch.Tensor:
        """timm's PatchEmbed layout after the projection: NLC (flatten), another format, then the norm; a family
        with another layout overrides it (its row's ``flexi_mixin``)."""
        if self.flatten:  # type: ignore[attr-defined]
            x = x.flatten(2).transpose(1, 2)
        elif self.output_fmt != Format.NCHW:  # type: ignore[attr-defined]
            x = nchw_to(x, self.output_fmt)  # type: ignore[attr-defined]
        return self.norm(x)  # type: ignore[attr-defined]


def make_flexi(module: nn.Module, cls: type) -> nn.Module:
    """Give ``module`` the flexi class ``cls`` (a subclass of its class and of :class:`FlexiEmbed`), in place, with an
    empty kernel cache, no sticky patch size and timm's kernel resampling (``set_input_size(patch_size=...)``).

    Args:
        module: A patch embedding.
        cls: Its flexi class.

    Returns:
        The same module.

    Example:
        >>> import timm
        >>> pe = timm.create_model("test_vit", img_size=32, patch_size=8).patch_embed
        >>> cls = type("FlexiPatchEmbed", (FlexiPatchEmbedMixin, type(pe)), {})
        >>> make_flexi(pe, cls).active_patch_size()
        (8, 8)
    """
    module.__class__ = cls
    if not isinstance(module, FlexiEmbed):
        raise TypeError(f"make_flexi: {cls.__name__} is not a subclass of FlexiEmbed")
    module._anysize_kernel_cache = PosEmbedCache(DEFAULT_CACHE_SIZE)
    module._anysize_sticky = None
    set_kernel_resampling(module, "bicubic", True)  # timm's set_input_size(patch_size=...)
    return module


def set_kernel_resampling(module: nn.Module, interpolation: str, antialias: bool) -> None:
    """Resize the kernel of a flexi patch embedding with ``interpolation`` and ``antialias`` (a variant's
    ``adapt.patch_embed``, as at load time); :func:`make_flexi` starts with timm's ``bicubic`` with antialias.

    Example:
        >>> import timm
        >>> pe = timm.create_model("test_vit", img_size=32, patch_size=8).patch_embed
        >>> pe = make_flexi(pe, type("FlexiPatchEmbed", (FlexiPatchEmbedMixin, type(pe)), {}))
        >>> set_kernel_resampling(pe, "bilinear", False)
        >>> pe.kernel_resampling()
        ('bilinear', False)
    """
    setattr(module, "_anysize_resample", (interpolation, antialias))
