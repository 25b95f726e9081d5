"""VOLO: its ``[1, H, W, C]`` position embedding resampled to the grid after the outlooker stage, cached.

The strided conv stem takes any input size; at the model's own size the path is timm's own, bit for bit.
"""

from typing import List, Tuple

import torch
import torch.nn as nn
from timm.models import volo

from timm_anysize.core.family import NO_CONV_PATCH, DynamicPath, Family, TinyModel, gray_and_4ch, no_patch_change
from timm_anysize.core.intermediates import Intermediates
from timm_anysize.core.runtime_options import RuntimeOptionsMixin

__all__ = ["FAMILIES", "DynamicVolo"]


class DynamicVolo(RuntimeOptionsMixin, Intermediates, volo.VOLO):
    """timm's VOLO with its ``[1, H, W, C]`` position embedding resampled to the grid after the outlookers."""

    intermediates_formats = ("NCHW",)
    intermediates_format_error = "Output format must be NCHW."

    def _anysize_pos(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_drop(x + self.image_pos_at(self.pos_embed, [x.shape[1], x.shape[2]], True))

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        for idx, block in enumerate(self.network):
            if idx == 2 and self.pos_embed is not None:  # where timm adds it: after the outlooker stage
                x = self._anysize_pos(x)
            x = block(x)
        B, H, W, C = x.shape
        return x.reshape(B, -1, C)

    def _intermediates_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return self.patch_embed(x).permute(0, 2, 3, 1), None  # B,C,H,W-> B,H,W,C

    def _intermediates_blocks(self) -> nn.ModuleList:
        return self.network

    def _intermediates_ends(self) -> List[int]:
        return self.stage_ends

    def _intermediates_block(self, i: int, block: nn.Module, x: torch.Tensor, ctx: None) -> Tuple[torch.Tensor, None]:
        if i == 2 and self.pos_embed is not None:  # where timm adds it: after the outlooker stage
            x = self._anysize_pos(x)
        return block(x), ctx

    def _intermediates_feature(self, i: int, x: torch.Tensor, ctx: None, norm: bool, output_fmt: str) -> torch.Tensor:
        return (self.norm(x) if norm and i >= 2 else x).permute(0, 3, 1, 2)

    def _intermediates_final(self, x: torch.Tensor, ctx: None, last: bool) -> torch.Tensor:
        if not last:
            return x
        B, H, W, C = x.shape
        x = x.reshape(B, -1, C)
        if self.post_network is not None:
            x = self.forward_cls(x)
        return self.norm(x)


FAMILIES = (
    Family(
        name="volo",
        dynamic_features=True,
        classes=(volo.VOLO,),
        tensors=(("pos_embed", "pos_nhwc"),),
        unsupported=no_patch_change(NO_CONV_PATCH),
        dynamic_args=(),  # conv stems take any size; enable_dynamic resamples the position embedding
        runtime=DynamicPath(classes={volo.VOLO: DynamicVolo}, patch_layout="none"),
        example="volo_d1_224",
        tiny=TinyModel(
            script_fx="tokens", conformance=gray_and_4ch((64, 96), 136), min_input=15, base="anysize_tiny_volo"
        ),  # full width: no size args
    ),
)
