"""Test infrastructure: a user's own timm architecture with a geometry-bound tensor and no family row (timm 1.0.31
has none left among its own modules), registered through timm's public registry. Not product code."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model


class PosGridNet(nn.Module):
    """A 4x4 patch conv, a ``[1, C, H/4, W/4]`` position embedding sized by ``img_size``, global pooling."""

    def __init__(self, img_size=64, in_chans: int = 3, num_classes: int = 10, dim: int = 8) -> None:
        super().__init__()
        h, w = to_2tuple(img_size)
        self.in_chans, self.num_classes = in_chans, num_classes
        self.stem = nn.Conv2d(in_chans, dim, 4, stride=4)
        self.pos_embed = nn.Parameter(torch.randn(1, dim, h // 4, w // 4) * 0.02)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.stem(x) + self.pos_embed).mean((2, 3)))


default_cfgs = generate_default_cfgs(
    {
        "anysize_posgrid.untrained": dict(
            input_size=(3, 64, 64), first_conv="stem", classifier="head", num_classes=10, fixed_input_size=True
        ),
    }
)


@register_model
def anysize_posgrid(pretrained: bool = False, **kwargs) -> PosGridNet:
    return build_model_with_cfg(PosGridNet, "anysize_posgrid", pretrained, **kwargs)
