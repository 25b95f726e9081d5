"""The one home of padding an input to a multiple and of refusing one that is not a multiple.

Every family that needs whole patches, windows or mask units pads through :func:`pad_to_multiple` (bottom/right
zeros, as timm's ``dynamic_img_pad``) and refuses through :func:`check_multiple`, which raises the one documented
:class:`~timm_anysize.core.errors.InputNotDivisibleError` naming the input size, the multiple and the nearest sizes
that work.

Both are TorchScript-friendly: :func:`pad_to_multiple` compiles; :func:`check_multiple` is called from
``@torch.jit.unused`` checks (a scripted model pads or trusts its input, as timm's own).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

from timm_anysize.core.errors import InputNotDivisibleError

__all__ = ["pad_to_multiple", "check_multiple", "nearest_multiples", "PAD_HINT"]

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


def nearest_multiples(size: int, multiple: int) -> List[int]:
    """The multiples of ``multiple`` nearest to ``size``: the one below (when positive) and the one above.

    Example:
        >>> nearest_multiples(70, 16), nearest_multiples(5, 16)
        ([64, 80], [16])
    """
    below = size // multiple * multiple
    above = below + multiple
    return [s for s in (below, above) if s > 0 and s != size]


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
    h, w = int(size[0]), int(size[1])
    mh, mw = int(multiple[0]), int(multiple[1])
    if h % mh == 0 and w % mw == 0:
        return
    heights = nearest_multiples(h, mh) if h % mh else [h]
    widths = nearest_multiples(w, mw) if w % mw else [w]
    near = " or ".join(f"{a}x{b}" for a, b in zip(heights + heights[-1:], widths + widths[-1:]))
    near = " or ".join(dict.fromkeys(near.split(" or ")))
    raise InputNotDivisibleError(
        f"input {h}x{w} is not a multiple of {what} {mh}x{mw} and padding is off; nearest sizes that work: {near}; "
        f"resize or crop to a multiple of {mh}x{mw}, or {hint}",
        size=(h, w),
        multiple=(mh, mw),
    )
