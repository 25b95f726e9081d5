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

The per-call machinery (the active patch size, the kernel cache, the patch-convolution mixin) is
:mod:`timm_anysize.core.flexi_embed`; a family whose patch embedding needs more says so in its ``Family`` row
(``flexi_embed``: its own flexi embedding; ``flexi_mixin``: its layout after the projection).
"""

from __future__ import annotations

import contextlib
import functools
import random
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn

from timm_anysize.core.attributes import module_attr
from timm_anysize.core.errors import AnysizeError, SpecError, UnsupportedModelError
from timm_anysize.core.family import Family
from timm_anysize.core.flexi_embed import (
    ACTIVE,
    FlexiEmbed,
    FlexiPatchEmbedMixin,
    Size2,
    make_flexi,
    set_kernel_resampling,
)
from timm_anysize.core.runtime_options import RuntimeOptions, runtime_options, set_runtime_options
from timm_anysize.core.spec import VariantSpec, as_pair
from timm_anysize.dynamic import enable_dynamic, is_dynamic
from timm_anysize.families import FAMILIES, family_of
from timm_anysize.model_plan import plan_of

__all__ = [
    "patch_size",
    "set_patch_size",
    "get_patch_size",
    "enable_flexi",
    "FlexiSchedule",
    "flexi_cache_info",
    "apply_flexi",
]

PatchSizeArg = Union[int, Sequence[int]]

_HOOK_STACK = threading.local()  # contexts saved by the training pre-hook, restored by the post-hook


def _size2(p: PatchSizeArg, what: str = "patch size") -> Size2:
    pair = as_pair(p)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise AnysizeError(f"{what} must be a positive int or (height, width) of positive ints, got {p!r}")
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


_FLEXI_CLASSES: dict[tuple[type, type], type] = {}


def _flexi_class(cls: type, mixin: type) -> type:
    """A subclass of the patch embedding's own class (timm's, or timm-anysize's dynamic one) with the flexi path of
    ``mixin`` (:class:`FlexiPatchEmbedMixin`, or the family's ``flexi_mixin``)."""
    if issubclass(cls, FlexiPatchEmbedMixin):
        return cls
    if (cls, mixin) not in _FLEXI_CLASSES:
        _FLEXI_CLASSES[cls, mixin] = type(f"Flexi{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return _FLEXI_CLASSES[cls, mixin]


def _family(model: nn.Module) -> Optional[Family]:
    """The family row of a model, also after timm-anysize's dynamic classes replaced its class."""
    fam = family_of(model)
    if fam is None:
        plan = plan_of(model)
        fam = plan.family if plan is not None else None
    if fam is None:
        fam = next(
            (f for f in FAMILIES if isinstance(model, f.classes) and (f.matches is None or f.matches(model))), None
        )
    return fam


def _embed_module(model: nn.Module) -> Optional[nn.Module]:
    """The module that embeds patches, as the model's family row names it (``patch_embed``; NaFlexViT's ``embeds``)."""
    fam = _family(model)
    return fam.patch_embed(model) if fam is not None else None


def _patch_embed(model: nn.Module) -> nn.Module:
    """Make ``model`` flexi (once) and return its patch embedding; a clear error for families without a kernel."""
    pe = _embed_module(model)
    if isinstance(pe, FlexiEmbed):
        return pe
    fam = _family(model)
    name = fam.name if fam is not None else type(model).__name__
    if pe is not None and fam is not None and fam.flexi_embed is not None:  # the family's own (not a patch conv)
        return fam.flexi_embed(pe)
    weight = getattr(getattr(pe, "proj", None), "weight", None)
    if pe is None or fam is None or not fam.changes_patch or not isinstance(weight, torch.Tensor) or weight.ndim != 4:
        reason = fam.unsupported.get("patch_smaller", "") if fam is not None else "not a supported timm family"
        raise UnsupportedModelError(
            f"timm_anysize.flexi: the {name} family has no single patch-embedding kernel to resize"
            + (f" ({reason})" if reason else "")
            + "; run-time patch sizes need a family with a patch-embedding conv (docs/families.md: patch_size columns)"
        )
    if not is_dynamic(model):
        enable_dynamic(model)  # the grid changes with the patch: the position embedding must follow it
    options = runtime_options(model)
    make_flexi(pe, _flexi_class(type(pe), fam.flexi_mixin or FlexiPatchEmbedMixin))
    set_runtime_options(pe, options if options is not None else RuntimeOptions(pad=False))  # pads as the model does
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
    setattr(pe, "_anysize_sticky", None if p is None else _size2(p))
    return model


def get_patch_size(model: nn.Module) -> Size2:
    """The patch size a call of ``model`` would use now, outside training draws.

    Example:
        >>> import timm
        >>> get_patch_size(timm.create_model("test_vit", img_size=32, patch_size=8))
        (8, 8)
    """
    pe = _embed_module(model)
    if isinstance(pe, FlexiEmbed):
        return pe.active_patch_size()
    fam = _family(model)
    size = fam.patch_size(model) if fam is not None else None
    if size is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no patch size")
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
    token = ACTIVE.set({**ACTIVE.get(), id(pe): _size2(p)})
    try:
        yield model
    finally:
        ACTIVE.reset(token)


# ---------------------------------------------------------------------------------------------- training (flexi)


def _pre_forward(pe: nn.Module, model: nn.Module, args: tuple) -> None:
    stack = getattr(_HOOK_STACK, "stack", None)
    if stack is None:
        stack = _HOOK_STACK.stack = []
    current = ACTIVE.get()
    stack.append(current)
    schedule = module_attr(model, "_anysize_flexi", FlexiSchedule)
    if model.training and id(pe) not in current:  # an explicit patch_size(...) block wins
        step = module_attr(model, "_anysize_flexi_step", int)
        p = schedule.draw(step)
        setattr(model, "_anysize_flexi_step", step + 1)
        seen = module_attr(model, "_anysize_flexi_seen", dict)
        seen[p] = seen.get(p, 0) + 1
        ACTIVE.set({**current, id(pe): p})


def _post_forward(model: nn.Module, args: tuple, output: Any) -> None:
    stack = getattr(_HOOK_STACK, "stack", None)
    if stack:
        ACTIVE.set(stack.pop())


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
        raise AnysizeError("enable_flexi: patch_sizes is empty; give at least one patch size")
    sizes = tuple(_size2(p) for p in patch_sizes)
    if weights is not None:
        weights = tuple(float(w) for w in weights)
        if len(weights) != len(sizes) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise AnysizeError(
                f"enable_flexi: weights {list(weights)} must be one non-negative number per patch size "
                f"({len(sizes)}), not all zero"
            )
    pe = _patch_embed(model)
    for handle in getattr(model, "_anysize_flexi_hooks", ()):
        handle.remove()
    setattr(model, "_anysize_flexi", FlexiSchedule(sizes, weights, seed))
    setattr(model, "_anysize_flexi_step", 0)
    setattr(model, "_anysize_flexi_seen", {})
    hooks = [
        model.register_forward_pre_hook(functools.partial(_pre_forward, pe)),
        model.register_forward_hook(_post_forward, always_call=True),
    ]
    setattr(model, "_anysize_flexi_hooks", hooks)
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
    if not isinstance(pe, FlexiEmbed):
        raise AnysizeError(f"{type(model).__name__} is not flexi; call set_patch_size or patch_size first")
    return pe.kernel_cache().info()


def apply_flexi(model: nn.Module, spec: VariantSpec) -> nn.Module:
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
    set_kernel_resampling(pe, spec.adapt.patch_embed.interpolation, spec.adapt.patch_embed.antialias)
    return enable_flexi(model, flexi.patch_sizes, flexi.weights, flexi.seed)
