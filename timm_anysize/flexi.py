"""Run-time patch size (FlexiViT): one model, any patch size per call, at inference and in training.

The patch-embedding module of a model gets a subclass whose forward convolves with the stored kernel
PI-resized to the patch size of the call (``timm.layers.resample_patch_embed``, as timm's
``set_input_size(patch_size=...)``); the stored kernel is never modified. The model runs on timm-anysize's dynamic
path (:func:`timm_anysize.enable_dynamic`), which reads the patch grid off the patch embedding's output (or asks the
patch embedding for it) and resamples the position embedding from the model's own grid to that one.

Which patch size a call uses, first match wins:

1. :func:`patch_size` (a context manager; per thread / asyncio task, like the dynamic grid);
2. in train mode with a ``flexi`` schedule (:func:`enable_flexi`, the YAML ``flexi`` key), one drawn per forward
   from the patch sizes and weights by a step counter and a seed, so every DDP rank draws the same size each step;
3. :func:`set_patch_size` (sticky until changed);
4. the model's own patch size.

The resized kernel is cached per patch size with the stamping of :class:`timm_anysize.core.cache.PosEmbedCache`
(invalidated by any change of the kernel: an optimizer step, ``load_state_dict``, ``.to()``), and computed inline
(differentiable, reaching the one stored kernel) when a gradient can flow to the kernel, or while compiling,
tracing or exporting.
"""

from __future__ import annotations

import contextlib
import copy
import contextvars
import random
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Format, resample_patch_embed
from timm.layers.format import nchw_to
from timm.models import naflexvit, swin_transformer_v2_cr

from timm_anysize.core.cache import DEFAULT_CACHE_SIZE, PosEmbedCache, must_run_inline
from timm_anysize.dynamic import enable_dynamic, is_dynamic
from timm_anysize.core.errors import SpecError
from timm_anysize.families import FAMILIES, Family, family_of

__all__ = [
    "patch_size",
    "set_patch_size",
    "get_patch_size",
    "enable_flexi",
    "FlexiSchedule",
    "flexi_cache_info",
    "flexi_from_spec",
    "apply_flexi",
]

Size2 = tuple[int, int]
PatchSizeArg = Union[int, Sequence[int]]

# Patch embedding (by id) -> patch size, for the calls in this context (thread / task).
_ACTIVE: contextvars.ContextVar[dict[int, Size2]] = contextvars.ContextVar("anysize_patch_size", default={})
_HOOK_STACK = threading.local()  # contexts saved by the training pre-hook, restored by the post-hook


def _size2(p: PatchSizeArg, what: str = "patch size") -> Size2:
    pair = (p, p) if isinstance(p, int) else tuple(p)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise ValueError(f"{what} must be a positive int or (height, width) of positive ints, got {p!r}")
    return (int(pair[0]), int(pair[1]))


@dataclass(frozen=True)
class FlexiSchedule:
    """Patch sizes drawn in train mode, one per forward (FlexiViT's recipe).

    The draw is a function of ``(seed, step)`` only, so DDP ranks that run the same number of forwards draw the same
    size each step.

    Example:
        >>> s = FlexiSchedule(((2, 2), (4, 4)), (1.0, 3.0), seed=0)
        >>> [s.draw(i) for i in range(3)] == [s.draw(i) for i in range(3)]
        True
    """

    patch_sizes: tuple[Size2, ...]
    weights: Optional[tuple[float, ...]] = None
    seed: int = 0

    def draw(self, step: int) -> Size2:
        """The patch size of forward number ``step``."""
        rng = random.Random(self.seed * 1_000_003 + step)
        return rng.choices(self.patch_sizes, weights=self.weights)[0]


class _FlexiPatchEmbedMixin:
    """Forward at the patch size of the call, with the stored kernel PI-resized (cached)."""

    _anysize_kernel_cache: PosEmbedCache
    _anysize_sticky: Optional[Size2]
    _anysize_resample: tuple[str, bool]

    def active_patch_size(self) -> Size2:
        """The patch size this call runs at (see the module docstring for the order)."""
        own = tuple(self.patch_size)  # type: ignore[attr-defined]
        p = _ACTIVE.get().get(id(self))
        if p is None:
            p = self._anysize_sticky
        return own if p is None else p  # type: ignore[return-value]

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
        return bool(getattr(self, "_anysize_pad", False))  # SwinV2-CR's: the model's pad option

    def kernel(self, p: Size2) -> torch.Tensor:
        """The stored kernel PI-resized to ``p`` (cached while no gradient can flow to it)."""
        weight = self.proj.weight  # type: ignore[attr-defined]
        interpolation, antialias = self._anysize_resample

        def compute() -> torch.Tensor:
            return resample_patch_embed(weight, list(p), interpolation=interpolation, antialias=antialias)

        if must_run_inline(weight):
            return compute()
        key = (p, weight.dtype, weight.device, torch.is_inference_mode_enabled())
        return self._anysize_kernel_cache.get_or_compute(key, weight, lambda: compute().detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.active_patch_size()
        if p == tuple(self.patch_size):  # type: ignore[attr-defined]
            return super().forward(x)  # type: ignore[misc]
        H, W = x.shape[-2:]
        pad_h, pad_w = (-H) % p[0], (-W) % p[1]
        if pad_h or pad_w:
            if not self._anysize_pads():
                raise ValueError(
                    f"input {H}x{W} is not a multiple of the patch {p[0]}x{p[1]} and padding is off; resize or crop "
                    f"to a multiple of the patch, or turn padding on (pad: true, enable_dynamic(pad=True))"
                )
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = F.conv2d(x, self.kernel(p), self.proj.bias, stride=p)  # type: ignore[attr-defined]
        return self._anysize_layout(x)

    def _anysize_layout(self, x: torch.Tensor) -> torch.Tensor:
        """timm's PatchEmbed layout after the projection: NLC (flatten), another format, then the norm."""
        if self.flatten:  # type: ignore[attr-defined]
            x = x.flatten(2).transpose(1, 2)
        elif self.output_fmt != Format.NCHW:  # type: ignore[attr-defined]
            x = nchw_to(x, self.output_fmt)  # type: ignore[attr-defined]
        return self.norm(x)  # type: ignore[attr-defined]


class _FlexiSwinV2CrMixin(_FlexiPatchEmbedMixin):
    def _anysize_layout(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # type: ignore[attr-defined]


class _LinearWith(nn.Module):
    """``F.linear`` with a given weight and bias (a PI-resized NaFlexViT projection for one call)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _FlexiNaFlexEmbeds(naflexvit.NaFlexEmbeds):
    """NaFlexViT's embeddings at a run-time patch size: an image input is patchified at the active patch and projected
    with the stored ``nn.Linear`` weight PI-resized as the conv kernel it is (``(ph, pw, C)`` or ``(C, ph, pw)``
    flattened, as timm's ``batch_patchify`` lays patches out); timm's own forward does the rest (its position
    embedding is interpolated to the grid). Pre-patchified (NaFlex) inputs and the built patch take timm's path.
    """

    active_patch_size = _FlexiPatchEmbedMixin.active_patch_size

    def kernel(self, p: Size2) -> torch.Tensor:
        """The stored linear weight PI-resized to ``p``, flattened as timm patchifies (cached like the others)."""
        weight = self.proj.weight
        interpolation, antialias = self._anysize_resample
        (ph, pw), c = self.patch_size, self.in_chans

        def compute() -> torch.Tensor:
            d = weight.shape[0]
            conv = (weight.reshape(d, ph, pw, c).permute(0, 3, 1, 2) if self.channels_last
                    else weight.reshape(d, c, ph, pw))
            conv = resample_patch_embed(conv, list(p), interpolation=interpolation, antialias=antialias)
            return (conv.permute(0, 2, 3, 1) if self.channels_last else conv).reshape(d, -1)

        if must_run_inline(weight):
            return compute()
        key = (p, weight.dtype, weight.device, torch.is_inference_mode_enabled())
        return self._anysize_kernel_cache.get_or_compute(key, weight, lambda: compute().detach())

    def forward(self, x: torch.Tensor, patch_coord: Optional[torch.Tensor] = None,
                patch_valid: Optional[torch.Tensor] = None):
        p = self.active_patch_size()
        if p == tuple(self.patch_size) or patch_coord is not None or not self.is_linear:
            return super().forward(x, patch_coord, patch_valid)
        if not self.dynamic_img_pad and (x.shape[-2] % p[0] or x.shape[-1] % p[1]):
            raise ValueError(
                f"input {x.shape[-2]}x{x.shape[-1]} is not a multiple of the patch {p[0]}x{p[1]} and NaFlexViT's "
                f"dynamic_img_pad is off; resize or crop to a multiple of the patch, or build it with "
                f"dynamic_img_pad=True"
            )
        # timm's forward on a shallow view of this module with this call's patch and projection: the module itself
        # is not modified, so threads at other patch sizes do not interfere.
        view = copy.copy(self)
        view.__dict__["patch_size"] = p
        view._modules = {**self._modules, "proj": _LinearWith(self.kernel(p), self.proj.bias)}
        return naflexvit.NaFlexEmbeds.forward(view, x, patch_coord, patch_valid)


def _flexi_naflex(embeds: nn.Module) -> nn.Module:
    """Make NaFlexViT's embeddings flexi (in place)."""
    embeds.__class__ = _FlexiNaFlexEmbeds
    embeds._anysize_kernel_cache = PosEmbedCache(DEFAULT_CACHE_SIZE)
    embeds._anysize_sticky = None
    embeds._anysize_resample = ("bicubic", True)
    return embeds


_FLEXI_CLASSES: dict[type, type] = {}


def _flexi_class(cls: type) -> type:
    """A subclass of the patch embedding's own class (timm's, or timm-anysize's dynamic one) with the flexi path."""
    if issubclass(cls, _FlexiPatchEmbedMixin):
        return cls
    if cls not in _FLEXI_CLASSES:
        mixin = _FlexiSwinV2CrMixin if issubclass(cls, swin_transformer_v2_cr.PatchEmbed) else _FlexiPatchEmbedMixin
        _FLEXI_CLASSES[cls] = type(f"Flexi{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return _FLEXI_CLASSES[cls]


def _family(model: nn.Module) -> Optional[Family]:
    """The family row of a model, also after timm-anysize's dynamic classes replaced its class."""
    fam = family_of(model)
    if fam is None:
        plan = getattr(model, "_anysize_plan", None)
        fam = plan.family if plan is not None else None
    if fam is None:
        fam = next((f for f in FAMILIES if isinstance(model, f.classes) and (f.matches is None or f.matches(model))),
                   None)
    return fam


def _embed_module(model: nn.Module) -> Optional[nn.Module]:
    """The module that embeds patches: ``patch_embed``, or NaFlexViT's ``embeds``."""
    pe = getattr(model, "patch_embed", None)
    return pe if pe is not None else getattr(model, "embeds", None)


def _patch_embed(model: nn.Module) -> nn.Module:
    """Make ``model`` flexi (once) and return its patch embedding; a clear error for families without a kernel."""
    pe = _embed_module(model)
    if isinstance(pe, (_FlexiPatchEmbedMixin, _FlexiNaFlexEmbeds)):
        return pe
    fam = _family(model)
    name = fam.name if fam is not None else type(model).__name__
    if fam is not None and fam.name == "naflexvit":
        return _flexi_naflex(pe)
    if fam is None or not fam.changes_patch or not isinstance(getattr(getattr(pe, "proj", None), "weight", None),
                                                              torch.Tensor) or pe.proj.weight.ndim != 4:
        reason = fam.unsupported.get("patch_smaller", "") if fam is not None else "not a supported timm family"
        raise TypeError(
            f"timm_anysize.flexi: the {name} family has no single patch-embedding kernel to resize"
            + (f" ({reason})" if reason else "")
            + "; run-time patch sizes need a family with a patch-embedding conv (docs/families.md: patch_size columns)"
        )
    if not is_dynamic(model):
        enable_dynamic(model)  # the grid changes with the patch: the position embedding must follow it
    pad = bool(getattr(model, "_anysize_dynamic", None) and model._anysize_dynamic.pad)
    pe.__class__ = _flexi_class(type(pe))
    pe._anysize_kernel_cache = PosEmbedCache(DEFAULT_CACHE_SIZE)
    pe._anysize_sticky = None
    pe._anysize_pad = pad
    pe._anysize_resample = ("bicubic", True)  # timm's set_input_size(patch_size=...)
    return pe


def set_patch_size(model: nn.Module, p: Optional[PatchSizeArg]) -> nn.Module:
    """Run ``model`` at patch size ``p`` from now on (``None``: its own); the stored kernel is not modified.

    The model is made dynamic (:func:`timm_anysize.enable_dynamic`) if it is not already: the patch grid changes
    with the patch size. Outputs equal those of a copy after timm's ``set_input_size(patch_size=p)``.

    Args:
        model: A ViT, DeiT, EVA, FlexiViT, BEiT, CaiT or Swin-family timm model; changed in place.
        p: Patch size, an int or ``(height, width)``; None returns to the model's own.

    Returns:
        The same model.

    Raises:
        TypeError: The model's family has no patch kernel to resize (the message names the family).

    Example:
        >>> import timm, torch
        >>> m = timm.create_model("test_vit", img_size=32, patch_size=8).eval()
        >>> _ = set_patch_size(m, 4)
        >>> m.forward_features(torch.randn(1, 3, 32, 32)).shape  # 1 class token + (32/4)^2 patches
        torch.Size([1, 65, 64])
    """
    pe = _patch_embed(model)
    pe._anysize_sticky = None if p is None else _size2(p)
    return model


def get_patch_size(model: nn.Module) -> Size2:
    """The patch size a call of ``model`` would use now, outside training draws.

    Example:
        >>> import timm
        >>> get_patch_size(timm.create_model("test_vit", img_size=32, patch_size=8))
        (8, 8)
    """
    pe = _embed_module(model)
    if isinstance(pe, (_FlexiPatchEmbedMixin, _FlexiNaFlexEmbeds)):
        return pe.active_patch_size()
    fam = _family(model)
    size = fam.patch_size(model) if fam is not None else None
    if size is None:
        raise TypeError(f"{type(model).__name__} has no patch size")
    return size


@contextlib.contextmanager
def patch_size(model: nn.Module, p: PatchSizeArg) -> Iterator[nn.Module]:
    """Run ``model`` at patch size ``p`` inside the block, in this thread / task only.

    Args:
        model: As for :func:`set_patch_size` (made flexi on first use).
        p: Patch size, an int or ``(height, width)``.

    Yields:
        The model.

    Example:
        >>> import timm, torch
        >>> m = timm.create_model("test_vit", img_size=32, patch_size=8).eval()
        >>> with patch_size(m, 16):
        ...     m.forward_features(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 5, 64])
    """
    pe = _patch_embed(model)
    token = _ACTIVE.set({**_ACTIVE.get(), id(pe): _size2(p)})
    try:
        yield model
    finally:
        _ACTIVE.reset(token)


# ---------------------------------------------------------------------------------------------- training (flexi)


def _pre_forward(model: nn.Module, args: tuple) -> None:
    pe = _embed_module(model)
    stack = getattr(_HOOK_STACK, "stack", None)
    if stack is None:
        stack = _HOOK_STACK.stack = []
    current = _ACTIVE.get()
    stack.append(current)
    schedule: FlexiSchedule = model._anysize_flexi
    if model.training and id(pe) not in current:  # an explicit patch_size(...) block wins
        p = schedule.draw(model._anysize_flexi_step)
        model._anysize_flexi_step += 1
        model._anysize_flexi_seen[p] = model._anysize_flexi_seen.get(p, 0) + 1
        _ACTIVE.set({**current, id(pe): p})


def _post_forward(model: nn.Module, args: tuple, output: Any) -> None:
    stack = getattr(_HOOK_STACK, "stack", None)
    if stack:
        _ACTIVE.set(stack.pop())


def enable_flexi(
    model: nn.Module,
    patch_sizes: Sequence[PatchSizeArg],
    weights: Optional[Sequence[float]] = None,
    seed: int = 0,
) -> nn.Module:
    """Train ``model`` at a patch size drawn per forward (FlexiViT), in place; eval runs at the one set.

    In train mode, each forward draws one of ``patch_sizes`` (with ``weights``) from a step counter and ``seed``, so
    every DDP rank uses the same size each step; the gradient reaches the one stored kernel. In eval mode the model
    runs at the size :func:`set_patch_size` set (else its own). ``model._anysize_flexi_seen`` counts the draws.

    Args:
        model: As for :func:`set_patch_size`.
        patch_sizes: Patch sizes to draw from (ints or ``(h, w)``).
        weights: Relative probability of each (default: uniform).
        seed: Seed of the draws (the same on every rank).

    Returns:
        The same model.

    Example:
        >>> import timm, torch
        >>> m = enable_flexi(timm.create_model("test_vit", img_size=32, patch_size=8), [4, 8, 16]).train()
        >>> for _ in range(8):
        ...     _ = m(torch.randn(1, 3, 32, 32))
        >>> len(m._anysize_flexi_seen) > 1
        True
    """
    if not patch_sizes:
        raise ValueError("enable_flexi: patch_sizes is empty; give at least one patch size")
    sizes = tuple(_size2(p) for p in patch_sizes)
    if weights is not None:
        weights = tuple(float(w) for w in weights)
        if len(weights) != len(sizes) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"enable_flexi: weights {list(weights)} must be one non-negative number per patch size "
                             f"({len(sizes)}), not all zero")
    _patch_embed(model)
    for handle in getattr(model, "_anysize_flexi_hooks", ()):
        handle.remove()
    model._anysize_flexi = FlexiSchedule(sizes, weights, seed)
    model._anysize_flexi_step = 0
    model._anysize_flexi_seen = {}
    model._anysize_flexi_hooks = [
        model.register_forward_pre_hook(_pre_forward),
        model.register_forward_hook(_post_forward, always_call=True),
    ]
    return model


def flexi_cache_info(model: nn.Module) -> dict[str, int]:
    """Hits, misses, invalidations and size of the resized-kernel cache.

    Example:
        >>> import timm, torch
        >>> m = set_patch_size(timm.create_model("test_vit", img_size=32, patch_size=8).eval(), 4)
        >>> with torch.no_grad():
        ...     _ = m(torch.randn(1, 3, 32, 32)); _ = m(torch.randn(1, 3, 32, 32))
        >>> flexi_cache_info(m)["hits"], flexi_cache_info(m)["misses"]
        (1, 1)
    """
    pe = _embed_module(model)
    if not isinstance(pe, (_FlexiPatchEmbedMixin, _FlexiNaFlexEmbeds)):
        raise ValueError(f"{type(model).__name__} is not flexi; call set_patch_size or patch_size first")
    return pe._anysize_kernel_cache.info()


def apply_flexi(model: nn.Module, spec: Any) -> nn.Module:
    """Set up a variant built from ``spec`` (a :class:`timm_anysize.VariantSpec`) for its ``flexi`` key, if any.

    Called once by :func:`timm_anysize.builder.build_variant`. The kernel is resized with the variant's
    ``adapt.patch_embed`` interpolation (as at load time).
    """
    flexi = getattr(spec, "flexi", None)
    if flexi is None:
        return model
    try:
        pe = _patch_embed(model)
    except TypeError as e:
        raise SpecError(f"{spec.where}.flexi: {e}; remove the flexi key") from None
    pe._anysize_resample = (spec.adapt.patch_embed.interpolation, spec.adapt.patch_embed.antialias)
    return enable_flexi(model, flexi.patch_sizes, flexi.weights, flexi.seed)


def flexi_from_spec(spec: Any) -> Optional[FlexiSchedule]:
    """The schedule a variant's ``flexi`` key describes, or None."""
    flexi = getattr(spec, "flexi", None)
    if flexi is None:
        return None
    return FlexiSchedule(tuple(flexi.patch_sizes), flexi.weights, flexi.seed)
