"""PiT, VOLO and CrossViT at any input size: position embeddings resampled to the grid their conv stems produce,
cached like the ViT one.

Their stems are convolutions that take any input size (PiT's overlapping kernel and VOLO's strided stem keep
whole output positions, dropping a remainder smaller than their stride); timm adds a position embedding of one
fixed grid after them. CrossViT resizes the input to each branch's size; here each branch's size follows the input
(scaled by the branch's ratio, rounded to its patch) instead of being fixed. At the model's own size every path is
timm's own, bit for bit.
"""

from __future__ import annotations

import torch
from timm.models import crossvit, pit, volo

from .cache import dynamic_image_pos_embed, dynamic_pos_embed
from .intermediates import IntermediatesAtOwnSize

__all__ = ["DynamicPit", "DynamicVolo", "DynamicCrossVit"]


class DynamicPit(IntermediatesAtOwnSize, pit.PoolingVisionTransformer):
    """timm's PiT with its ``[1, C, H, W]`` position embedding resampled to the stem's output grid."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self.pos_drop(x + dynamic_image_pos_embed(self, x.shape[-2:], channels_last=False))
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        x, cls_tokens = self.transformers((x, cls_tokens))
        return self.norm(cls_tokens)


class DynamicVolo(IntermediatesAtOwnSize, volo.VOLO):
    """timm's VOLO with its ``[1, H, W, C]`` position embedding resampled to the grid after the outlookers."""

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        for idx, block in enumerate(self.network):
            if idx == 2 and self.pos_embed is not None:  # where timm adds it: after the outlooker stage
                x = self.pos_drop(x + dynamic_image_pos_embed(self, x.shape[1:3], channels_last=True))
            x = block(x)
        B, H, W, C = x.shape
        return x.reshape(B, -1, C)


class DynamicCrossVit(crossvit.CrossVit):
    """timm's CrossViT with each branch at a size that follows the input, and its position embedding resampled."""

    def _embed(self, x: torch.Tensor) -> list[torch.Tensor]:
        B, _, H, W = x.shape
        native = (H, W) == tuple(self.img_size)
        xs = []
        for i, patch_embed in enumerate(self.patch_embed):
            (ph, pw), (sh, sw) = patch_embed.patch_size, self.img_size_scaled[i]
            if native:
                size = (sh, sw)
            else:  # the branch's ratio to the model's size, rounded to whole patches
                size = (max(ph, round(H * sh / self.img_size[0] / ph) * ph),
                        max(pw, round(W * sw / self.img_size[1] / pw) * pw))
            x_ = crossvit.scale_image(x, size, self.crop_scale)
            x_ = patch_embed.proj(x_).flatten(2).transpose(1, 2)  # timm's PatchEmbed without its size assert
            cls_tokens = (self.cls_token_0 if i == 0 else self.cls_token_1).expand(B, -1, -1)
            native_grid = (sh // ph, sw // pw)
            grid = (size[0] // ph, size[1] // pw)
            pos = dynamic_pos_embed(self, grid, prefix=1, name=f"pos_embed_{i}", native=native_grid)
            xs.append(self.pos_drop(torch.cat((cls_tokens, x_), dim=1) + pos))
        return xs
