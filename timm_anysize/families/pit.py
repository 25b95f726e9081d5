"""PiT: its ``[1, C, H, W]`` position embedding resampled to the grid its (overlapping) conv stem produces, cached.

The stem takes any input size, keeping whole output positions; timm adds a position embedding of one fixed grid
after it. At the model's own size the path is timm's own, bit for bit.
"""

from typing import Tuple

import torch
import torch.nn as nn
from timm.models import pit

from timm_anysize.core.family import DynamicPath, Family, TinyModel, gray_and_4ch, no_patch_change
from timm_anysize.core.intermediates import Intermediates
from timm_anysize.core.runtime_options import RuntimeOptionsMixin

__all__ = ["FAMILIES", "DynamicPit"]


class DynamicPit(RuntimeOptionsMixin, Intermediates, pit.PoolingVisionTransformer):
    """timm's PiT with its ``[1, C, H, W]`` position embedding resampled to the stem's output grid."""

    intermediates_formats = ("NCHW",)
    intermediates_format_error = "Output shape must be NCHW."

    def _anysize_pos(self, x: torch.Tensor) -> torch.Tensor:
        """The stem's output plus the position embedding of its grid."""
        x = self.patch_embed(x)
        return self.pos_drop(x + self.image_pos_at(self.pos_embed, [x.shape[-2], x.shape[-1]], False))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._anysize_pos(x)
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        x, cls_tokens = self.transformers((x, cls_tokens))
        return self.norm(cls_tokens)

    def _intermediates_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self._anysize_pos(x)
        return x, self.cls_token.expand(x.shape[0], -1, -1)  # the class tokens travel as the context

    def _intermediates_blocks(self) -> nn.Sequential:
        return self.transformers

    def _intermediates_block(
        self, i: int, stage: nn.Module, x: torch.Tensor, cls_tokens: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        return stage((x, cls_tokens))

    def _intermediates_feature(
        self, i: int, x: torch.Tensor, cls_tokens: torch.Tensor, norm: bool, output_fmt: str
    ) -> torch.Tensor:
        return x

    def _intermediates_final(self, x: torch.Tensor, cls_tokens: torch.Tensor, last: bool) -> torch.Tensor:
        return self.norm(cls_tokens) if last else cls_tokens


FAMILIES = (
    Family(
        name="pit",
        dynamic_features=True,
        classes=(pit.PoolingVisionTransformer,),
        tensors=(("pos_embed", "pos_nchw"),),
        unsupported=no_patch_change(
            "PiT's patch kernel overlaps (stride = patch / 2); resizing it changes what a token sees"
        ),
        dynamic_args=(),  # conv stems take any size; enable_dynamic resamples the position embedding
        runtime=DynamicPath(classes={pit.PoolingVisionTransformer: DynamicPit}, patch_layout="none"),
        example="pit_ti_224",
        tiny=TinyModel(
            dict(depth=(1, 1, 1)), script_fx="tokens", conformance=gray_and_4ch((64, 96), 136), min_input=16
        ),
    ),
)
