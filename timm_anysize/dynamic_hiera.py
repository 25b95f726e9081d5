"""Hiera at any input size: the token unrolling rebuilt for each size, the position embedding resampled (cached).

timm's Hiera fixes its input size at construction: ``Unroll`` reorders tokens for one grid so that mask units
(8x8 tokens) and the pooling strides are contiguous in memory. Everything after the unroll reads sizes off the
token count, so an unroll built for the input's grid is all another size needs; inputs are padded (bottom/right)
to whole mask units. At the model's own size the path is timm's own, bit for bit.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.models import hiera

from .cache import dynamic_pos_embed
from .intermediates import IntermediatesAtOwnSize

__all__ = ["DynamicHiera"]


class DynamicHiera(IntermediatesAtOwnSize, hiera.Hiera):
    """timm's Hiera at any input size (set by :func:`timm_anysize.enable_dynamic`).

    Other sizes take the classification path only: no masks (MAE-style), no intermediates, no separate
    space/time position embeddings (video); those raise a ``ValueError``.
    """

    def _unit(self) -> tuple[int, int]:
        """Input pixels per mask unit: what every size must be a multiple of."""
        return (self.patch_stride[0] * self.mask_unit_size[0], self.patch_stride[1] * self.mask_unit_size[1])

    def forward_features(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, return_intermediates: bool = False
    ) -> torch.Tensor:
        native = [t * s for t, s in zip(self.tokens_spatial_shape, self.patch_stride)]
        if list(x.shape[-2:]) == native:
            return super().forward_features(x, mask=mask, return_intermediates=return_intermediates)
        patch_drop = self.training and self.patch_drop_rate > 0
        if mask is not None or return_intermediates or self.pos_embed is None or patch_drop:
            raise ValueError(
                f"Hiera at {x.shape[-2]}x{x.shape[-1]} (built for {native[0]}x{native[1]}): masks, intermediates, "
                f"patch dropout and separate space/time position embeddings run at the built size only"
            )
        uh, uw = self._unit()
        pad_h, pad_w = (-x.shape[-2]) % uh, (-x.shape[-1]) % uw
        if pad_h or pad_w:
            if not self._anysize_dynamic.pad:
                raise ValueError(
                    f"input {x.shape[-2]}x{x.shape[-1]} is not a multiple of Hiera's mask unit ({uh}x{uw} px) and "
                    f"padding is off; resize to a multiple, or turn padding on (pad: true, enable_dynamic(pad=True))"
                )
            x = F.pad(x, (0, pad_w, 0, pad_h))
        size = (x.shape[-2], x.shape[-1])
        grid = (size[0] // self.patch_stride[0], size[1] // self.patch_stride[1])
        x = self.patch_embed(x)
        x = x + self._dynamic_pos_embed(grid)
        x = hiera.Unroll(size, self.patch_stride, self.unroll.schedule)(x)
        for blk in self.blocks:
            x = blk(x)
        return x

    def _dynamic_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        if self.pos_embed_win is None:
            return dynamic_pos_embed(self, grid, prefix=0, native=tuple(self.tokens_spatial_shape))
        # absolute-window variant: timm's recipe at the grid's number of mask units
        units = (grid[0] // self.mask_unit_size[0], grid[1] // self.mask_unit_size[1])
        pos_embed_win = self.pos_embed_win.tile(units)
        pos_embed = F.interpolate(self.pos_embed, size=pos_embed_win.shape[-2:], mode="bicubic", antialias=True)
        return (pos_embed + pos_embed_win).flatten(2).transpose(1, 2)
