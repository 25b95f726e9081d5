"""The one home of padding an input to a multiple and of refusing an input size a model cannot run at.

Every family that needs whole patches, windows or mask units pads through :func:`pad_to_multiple` (bottom/right
zeros, as timm's ``dynamic_img_pad``) and refuses through :func:`check_multiple`, which raises the one documented
:class:`~timm_anysize.core.errors.InputNotDivisibleError` naming the input size, the multiple and the nearest sizes
that work. :func:`check_input_size` also refuses an input smaller than the model's smallest (its stem and stride
chain) with the same error's base class, :class:`~timm_anysize.core.errors.InputSizeError`, and
:func:`check_fixed_size` any size but its own for a model that runs at one size only.

Both are TorchScript-friendly: :func:`pad_to_multiple` compiles; :func:`check_multiple` is called from
``@torch.jit.unused`` checks (a scripted model pads or trusts its input, as timm's own).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

from timm_anysize.core.errors import InputNotDivisibleError, InputSizeError

__all__ = [
    "pad_to_multiple",
    "check_multiple",
    "check_input_size",
    "check_fixed_size",
    "nearest_multiples",
    "PAD_HINT",
]

# How to make a non-multiple input work, for every message that refuses one.
PAD_HINT = "turn padding on (pad: true in the variant's YAML, enable_dynamic(pad=True))"


# FX: a leaf of timm's tracer wherever it is called; a module whose plain torch.fx traces need it as a leaf also
# calls torch.fx.wrap("pad_to_multiple") after importing it (fx.wrap patches the calling module's globals).
@register_notrace_function
def pad_to_multiple(x: torch.Tensor, multiple: List[int], always: bool = False) -> torch.Tensor:
    """An image ``[B, C, H, W]`` zero-padded bottom/right to a multiple of ``multiple`` (``[mh, mw]``).

    The input itself comes back when it already is one, unless ``always`` (scripting, tracing, compiling or
    exporting: the graph must not branch on the size, so it pads, possibly by zero, as timm does).

    Example:
        >>> pad_to_multiple(torch.zeros(1, 3, 30, 70), [4, 32]).shape
        torch.Size([1, 3, 32, 96])
    """
    pad_h = (multiple[0] - x.shape[-2] % multiple[0]) % multiple[0]
    pad_w = (multiple[1] - x.shape[-1] % multiple[1]) % multiple[1]
    if not always and pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h))


def nearest_multiples(size: int, multiple: int, smallest: Optional[int] = None) -> List[int]:
    """The sizes nearest to ``size`` that are multiples of ``multiple`` and at least ``smallest`` (itself a multiple;
    None: ``multiple``): ``[size]`` when it is one, ``[smallest]`` when ``size`` is below it, else the one below and
    the one above.

    Example:
        >>> nearest_multiples(70, 16), nearest_multiples(5, 16), nearest_multiples(64, 16), nearest_multiples(20, 4, 24)
        ([64, 80], [16], [64], [24])
    """
    smallest = multiple if smallest is None else smallest
    if size >= smallest and size % multiple == 0:
        return [size]
    if size < smallest:
        return [smallest]
    below = size // multiple * multiple
    return [s for s in (below, below + multiple) if s >= smallest]


def check_multiple(size: Sequence[int], multiple: Sequence[int], what: str = "the patch", hint: str = PAD_HINT) -> None:
    """Raise :class:`InputNotDivisibleError` when an input ``size`` (H, W) is not a multiple of ``multiple``.

    Args:
        size: The input's (H, W).
        multiple: What each side must be a multiple of.
        what: What needs the multiple, for the message ("the patch", "Hiera's mask unit", ...).
        hint: How to fix it besides resizing or cropping.

    Example:
        >>> check_multiple((64, 64), (16, 16))
        >>> check_multiple((70, 64), (16, 16))
        Traceback (most recent call last):
        ...
        timm_anysize.core.errors.InputNotDivisibleError: input 70x64 is not a multiple of the patch 16x16 and \
padding is off; nearest sizes that work: 64x64 or 80x64; resize or crop to a multiple of 16x16, or turn padding on \
(pad: true in the variant's YAML, enable_dynamic(pad=True))
    """
    check_input_size(size, (1, 1), multiple, what=what, hint=hint)


def _pairs(heights: List[int], widths: List[int]) -> List[tuple[int, int]]:
    """(H, W) pairs of the nearest heights and widths, in order, without repeats."""
    return list(dict.fromkeys(zip(heights + heights[-1:], widths + widths[-1:])))


def check_input_size(
    size: Sequence[int],
    minimum: Sequence[int],
    multiple: Sequence[int] = (1, 1),
    what: str = "the patch",
    hint: str = PAD_HINT,
) -> None:
    """Raise the documented error when a model cannot run at an input ``size`` (H, W): smaller than ``minimum``
    (:class:`InputSizeError`) or not a multiple of ``multiple`` (:class:`InputNotDivisibleError`, a subclass).

    The message names the input size, the minimum or the multiple and the nearest sizes that work (multiples of
    ``multiple`` at least ``minimum``); the error carries them as attributes.

    Args:
        size: The input's (H, W).
        minimum: The smallest (H, W) the model runs at (its stem and stride chain).
        multiple: What each side must be a multiple of ((1, 1): anything).
        what: What needs the multiple, for the message ("the patch", "TResNet's 4x4 space-to-depth", ...).
        hint: How to make a non-multiple work besides resizing or cropping.

    Example:
        >>> check_input_size((64, 48), (16, 16))
        >>> check_input_size((9, 64), (16, 16))
        Traceback (most recent call last):
        ...
        timm_anysize.core.errors.InputSizeError: input 9x64 is smaller than the smallest input this model runs at, \
16x16 (its stem and strides); nearest sizes that work: 16x64; resize or pad the image to at least 16x16
        >>> check_input_size((70, 70), (20, 20), (4, 4), what="the space-to-depth")
        Traceback (most recent call last):
        ...
        timm_anysize.core.errors.InputNotDivisibleError: input 70x70 is not a multiple of the space-to-depth 4x4 and \
padding is off; nearest sizes that work: 68x68 or 72x72; resize or crop to a multiple of 4x4, or turn padding on \
(pad: true in the variant's YAML, enable_dynamic(pad=True))
    """
    h, w = int(size[0]), int(size[1])
    mh, mw = int(multiple[0]), int(multiple[1])
    low_h, low_w = int(minimum[0]), int(minimum[1])
    if h >= low_h and w >= low_w and h % mh == 0 and w % mw == 0:
        return
    # the smallest size that works on each axis: the minimum rounded up to the multiple
    first_h, first_w = -(-max(low_h, 1) // mh) * mh, -(-max(low_w, 1) // mw) * mw
    near = _pairs(nearest_multiples(h, mh, first_h), nearest_multiples(w, mw, first_w))
    names = " or ".join(f"{a}x{b}" for a, b in near)
    if h < low_h or w < low_w:
        of = f" (a multiple of {mh}x{mw})" if (mh, mw) != (1, 1) else ""
        raise InputSizeError(
            f"input {h}x{w} is smaller than the smallest input this model runs at, {first_h}x{first_w}{of} (its "
            f"stem and strides); nearest sizes that work: {names}; resize or pad the image to at least "
            f"{first_h}x{first_w}",
            size=(h, w),
            minimum=(low_h, low_w),
            multiple=(mh, mw),
            nearest=tuple(near),
        )
    raise InputNotDivisibleError(
        f"input {h}x{w} is not a multiple of {what} {mh}x{mw} and padding is off; nearest sizes that work: {names}; "
        f"resize or crop to a multiple of {mh}x{mw}, or {hint}",
        size=(h, w),
        minimum=(low_h, low_w),
        multiple=(mh, mw),
        nearest=tuple(near),
    )


def check_fixed_size(size: Sequence[int], own: Sequence[int]) -> None:
    """Raise :class:`InputSizeError` when a model that runs at its own size only (a variant built with
    ``dynamic: false``) gets another input ``size`` (H, W).

    Example:
        >>> check_fixed_size((64, 64), (64, 64))
        >>> check_fixed_size((96, 64), (64, 64))
        Traceback (most recent call last):
        ...
        timm_anysize.core.errors.InputSizeError: input 96x64: this model runs at its own size 64x64 only (dynamic: \
false); nearest sizes that work: 64x64; resize or crop to 64x64, or build the variant with dynamic: true to run at \
any size
    """
    h, w, oh, ow = int(size[0]), int(size[1]), int(own[0]), int(own[1])
    if (h, w) == (oh, ow):
        return
    raise InputSizeError(
        f"input {h}x{w}: this model runs at its own size {oh}x{ow} only (dynamic: false); nearest sizes that work: "
        f"{oh}x{ow}; resize or crop to {oh}x{ow}, or build the variant with dynamic: true to run at any size",
        size=(h, w),
        minimum=(oh, ow),
        multiple=(oh, ow),
        nearest=((oh, ow),),
    )
