"""Shifted-window attention at any input size, for the Swin families (Swin, SwinV2, SwinV2-CR).

timm's Swin blocks roll the feature map, *then* pad it to a multiple of the window, and build the shift mask for
the padded size. When the padding is not a multiple of the window that mask is wrong: tokens wrapped around from
one edge share a region with tokens of the opposite edge and attend to them, and real tokens attend to the zero
padding. Here the map is padded first and then rolled (as the original Swin does), and the mask labels every
position by its region in the shifted frame *and* by whether it is padding, so real tokens attend exactly to the
real tokens of their own window region. Where no padding is needed the mask and the outputs are timm's own,
bit for bit. Masks depend only on sizes; they are cached per size.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models import FeatureListNet, swin_transformer, swin_transformer_v2, swin_transformer_v2_cr

from ..cache import traced
from ..spec import Size2
from ..family import REL_TABLE, DynamicPath, Family

__all__ = ["FAMILIES", "shifted_window_mask", "window_attention", "enable_swin_dynamic", "pads_at_own_size", "SWIN_BLOCKS"]

MASK_VALUE = -100.0  # timm's value for masked pairs


def _labels(size: Size2, padded: Size2, window: Size2, shift: Size2) -> torch.Tensor:
    """Region label of every position of the padded, rolled map: same label <=> may attend to each other."""
    (h, w), (hp, wp) = size, padded
    rows = torch.zeros(hp, dtype=torch.long)
    cols = torch.zeros(wp, dtype=torch.long)
    # timm's three bands per axis in the rolled frame: before the last window, the last window's unwrapped part,
    # and the wrapped-around part; a band index without a shift is 0 everywhere.
    for axis, (n, ws, s) in ((rows, (hp, window[0], shift[0])), (cols, (wp, window[1], shift[1]))):
        if s:
            axis[n - ws:n - s] = 1
            axis[n - s:] = 2
    region = rows[:, None] * 3 + cols[None, :]
    # Padding sits at rows >= h / cols >= w before the roll; roll its map as the features are rolled.
    pad = torch.zeros(hp, wp, dtype=torch.bool)
    pad[h:, :] = True
    pad[:, w:] = True
    pad = torch.roll(pad, shifts=(-shift[0], -shift[1]), dims=(0, 1))
    return torch.where(pad, torch.full_like(region, 9), region)


@lru_cache(maxsize=64)
def _cached_mask(size: Size2, padded: Size2, window: Size2, shift: Size2, device: torch.device, dtype: torch.dtype):
    return shifted_window_mask(size, padded, window, shift, device, dtype)


def shifted_window_mask(
    size: Size2, padded: Size2, window: Size2, shift: Size2, device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> Optional[torch.Tensor]:
    """The additive attention mask ``[num_windows, area, area]`` of one block, or None when nothing is masked.

    Args:
        size: The feature map's real (H, W).
        padded: (H, W) padded up to a multiple of the window.
        window: Window size.
        shift: Cyclic shift (0, 0 for a block without shift).

    Example:
        >>> shifted_window_mask((8, 8), (8, 8), (4, 4), (0, 0)) is None
        True
        >>> shifted_window_mask((6, 8), (8, 8), (4, 4), (2, 2)).shape
        torch.Size([4, 16, 16])
    """
    if size == padded and not any(shift):
        return None
    labels = _labels(size, padded, window, shift).to(device)
    windows = _partition(labels[None, :, :, None], window).reshape(-1, window[0] * window[1])
    differ = windows.unsqueeze(1) != windows.unsqueeze(2)
    return torch.zeros(differ.shape, device=device, dtype=dtype).masked_fill(differ, MASK_VALUE)


def _partition(x: torch.Tensor, window: Size2) -> torch.Tensor:
    """``[B, H, W, C]`` -> ``[B * num_windows, wh, ww, C]`` in timm's window order."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // window[0], window[0], W // window[1], window[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0], window[1], C)


def _reverse(windows: torch.Tensor, window: Size2, H: int, W: int) -> torch.Tensor:
    C = windows.shape[-1]
    x = windows.reshape(-1, H // window[0], W // window[1], window[0], window[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def window_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Swin block's (shifted) window attention on ``[B, H, W, C]`` of any H, W: pad, roll, attend, undo."""
    B, H, W, C = x.shape
    window, shift = tuple(block.window_size), tuple(block.shift_size)
    pad_h, pad_w = (-H) % window[0], (-W) % window[1]
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = _partition(x, window).reshape(-1, window[0] * window[1], C)
    make_mask = shifted_window_mask if traced() else _cached_mask
    mask = make_mask((H, W), (Hp, Wp), window, shift, x.device, x.dtype)
    out = block.attn(windows, mask=mask).reshape(-1, window[0], window[1], C)
    x = _reverse(out, window, Hp, Wp)
    if any(shift):
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x[:, :H, :W, :].contiguous() if (pad_h or pad_w) else x


class DynamicSwinBlock(swin_transformer.SwinTransformerBlock):
    """timm's Swin block with window attention at any size (see the module docstring)."""

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        return window_attention(self, x)


class DynamicSwinV2Block(swin_transformer_v2.SwinTransformerV2Block):
    """timm's SwinV2 block with window attention at any size."""

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        return window_attention(self, x)


class DynamicSwinV2CrBlock(swin_transformer_v2_cr.SwinTransformerV2CrBlock):
    """timm's SwinV2-CR block with window attention at any size."""

    def _shifted_window_attn(self, x: torch.Tensor) -> torch.Tensor:
        return window_attention(self, x)


SWIN_BLOCKS: dict[type, type] = {
    swin_transformer.SwinTransformerBlock: DynamicSwinBlock,
    swin_transformer_v2.SwinTransformerV2Block: DynamicSwinV2Block,
    swin_transformer_v2_cr.SwinTransformerV2CrBlock: DynamicSwinV2CrBlock,
}
SWIN_MODELS = (
    swin_transformer.SwinTransformer,
    swin_transformer_v2.SwinTransformerV2,
    swin_transformer_v2_cr.SwinTransformerV2Cr,
)


def enable_swin_dynamic(model: nn.Module, pad: bool) -> None:
    """Make a Swin-family model run at any input size, in place: patch padding (``pad``) and correct masks."""
    for module in model.modules():
        dynamic_cls = SWIN_BLOCKS.get(type(module))
        if dynamic_cls is not None:
            module.__class__ = dynamic_cls
            module.dynamic_mask = True
            module.attn_mask = None  # the fixed-size mask is never used again
    model.dynamic_img_size = True  # (on a feature wrapper of a Swin model, its flattened modules)
    pe = model.patch_embed
    pe.strict_img_size = False
    if isinstance(pe, PatchEmbed):
        pe.dynamic_img_pad = pad
    elif pad:  # SwinV2-CR's own patch embedding cannot pad: pad its input, bottom/right as timm's PatchEmbed does
        model._anysize_pad_hooks.append(pe.register_forward_pre_hook(_pad_to_patch))


def _pad_to_patch(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    pad_h, pad_w = (-x.shape[-2]) % module.patch_size[0], (-x.shape[-1]) % module.patch_size[1]
    return (F.pad(x, (0, pad_w, 0, pad_h)), *args[1:]) if pad_h or pad_w else args


def pads_at_own_size(model: nn.Module) -> bool:
    """Whether any block of a Swin-family model pads its feature map at the size the model was built for (there,
    timm's masks and these differ)."""
    for module in model.modules():
        if type(module) in SWIN_BLOCKS or type(module) in SWIN_BLOCKS.values():
            size = getattr(module, "input_resolution", None) or getattr(module, "feat_size", None)
            if size is not None and any(s % w for s, w in zip(size, module.window_size)):
                return True
    return False


def _claims(model: nn.Module) -> bool:
    """A Swin-family model, or a ``features_only`` wrapper holding Swin blocks (flattened into it by timm)."""
    if type(model) in SWIN_MODELS:
        return True
    return type(model) is FeatureListNet and any(type(m) in SWIN_BLOCKS for m in model.modules())


_RUNTIME = DynamicPath(enable=enable_swin_dynamic, claims=_claims)
_SWIN_DYNAMIC = ("dynamic_img_size",)

FAMILIES = (
    Family(
        name="swin",
        dynamic_features=True,
        classes=(swin_transformer.SwinTransformer,),
        tensors=REL_TABLE,
        dynamic="cached",
        dynamic_args=_SWIN_DYNAMIC,
        runtime=_RUNTIME,
        example="swin_tiny_patch4_window7_224",
    ),
    Family(
        name="swinv2",
        dynamic_features=True,
        classes=(swin_transformer_v2.SwinTransformerV2,),
        tensors=(),  # continuous position bias (an MLP over log coordinates): no table to resize
        dynamic="cached",
        dynamic_args=_SWIN_DYNAMIC,
        runtime=_RUNTIME,
        example="swinv2_tiny_window8_256",
    ),
    Family(
        name="swinv2_cr",
        dynamic_features=True,
        classes=(swin_transformer_v2_cr.SwinTransformerV2Cr,),
        tensors=(),
        dynamic="cached",
        dynamic_args=_SWIN_DYNAMIC,
        runtime=_RUNTIME,
        example="swinv2_cr_tiny_224",
    ),
)
