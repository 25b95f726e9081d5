"""Resampling geometry-dependent tensors laid out on grids, as one function per layout.

Used both when weights are loaded at a new geometry (:mod:`timm_anysize.adapt`) and at run time by the dynamic
paths (:mod:`timm_anysize.cache`, :mod:`timm_anysize.families.levit`, :mod:`timm_anysize.families.mvitv2`), so a model
adapted to a size and a dynamic model run at that size compute the same tensors, bit for bit.
"""


from typing import List

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed_nhwc

from .spec import Size2

__all__ = ["resample_grid", "resample_blocks", "resize_bias_grid", "resize_rel_axis"]


def resample_grid(
    grid: torch.Tensor, new_grid: List[int], interpolation: str, antialias: bool, channels_last: bool
) -> torch.Tensor:
    """Resample a position embedding laid out as an image, ``[1, C, H, W]`` (or ``[1, H, W, C]``), to ``new_grid``
    (TorchScript compiles it: the dynamic paths call it when scripted).

    Example:
        >>> resample_grid(torch.randn(1, 8, 4, 6), (8, 3), "bicubic", True, channels_last=False).shape
        torch.Size([1, 8, 8, 3])
    """
    nhwc = grid if channels_last else grid.permute(0, 2, 3, 1)
    out = resample_abs_pos_embed_nhwc(nhwc, new_size=[new_grid[0], new_grid[1]], interpolation=interpolation,
                                      antialias=antialias)
    return out if channels_last else out.permute(0, 3, 1, 2).contiguous()


def resample_blocks(
    blocks: torch.Tensor, new_grid: List[int], interpolation: str, antialias: bool
) -> torch.Tensor:
    """Resample a position embedding laid out in blocks (NesT), ``[1, T, N, C]``: ``T`` blocks (``g x g``) of
    ``N`` positions each (a square block), to the grid ``new_grid`` cut into the same ``g x g`` blocks (each
    ``new_grid / g``). The blocks are put together into one image, resampled, and cut again -- timm's
    ``nest.resize_pos_embed`` (there with no antialias and square grids only). TorchScript compiles it.

    Example:
        >>> resample_blocks(torch.randn(1, 4, 3 * 3, 8), [10, 8], "bicubic", True).shape
        torch.Size([1, 4, 20, 8])
    """
    _, t, n, c = blocks.shape
    g, b = int(round(t ** 0.5)), int(round(n ** 0.5))
    image = blocks.reshape(1, g, g, b, b, c).transpose(2, 3).reshape(1, g * b, g * b, c)
    image = resample_grid(image, new_grid, interpolation, antialias, channels_last=True)
    bh, bw = new_grid[0] // g, new_grid[1] // g
    return image.reshape(1, g, bh, g, bw, c).transpose(2, 3).reshape(1, t, bh * bw, c)


def resize_bias_grid(biases: torch.Tensor, old_grid: Size2, new_grid: Size2, interpolation: str) -> torch.Tensor:
    """Resize attention biases indexed by ``|dy|, |dx|`` offsets (LeViT), ``[heads, H*W]``, between two grids.

    Example:
        >>> resize_bias_grid(torch.randn(4, 7 * 7), (7, 7), (8, 6), "bicubic").shape
        torch.Size([4, 48])
    """
    heads = biases.shape[0]
    grid = biases.reshape(1, heads, *old_grid).float()
    out = F.interpolate(grid, size=tuple(new_grid), mode=interpolation, align_corners=False)
    return out.reshape(heads, -1).to(biases.dtype)


def resize_rel_axis(table: torch.Tensor, length: int) -> torch.Tensor:
    """Resize a one-axis relative-position table ``[2n - 1, C]`` to ``length`` entries (linear, as MViTv2 does).

    Example:
        >>> resize_rel_axis(torch.randn(13, 8), 27).shape
        torch.Size([27, 8])
    """
    if table.shape[0] == length:
        return table
    out = F.interpolate(table.float().t()[None], size=length, mode="linear", align_corners=False)
    return out[0].t().to(table.dtype).contiguous()
