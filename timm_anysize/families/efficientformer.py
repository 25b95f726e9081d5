"""EfficientFormer (V1) at any size: the last stage's attention biases resized to the grid the input gives it.

Why timm marks it ``fixed_input_size``: its attentions (the ``num_vit`` token blocks of the last stage) are built
for a 7 x 7 grid whatever ``img_size`` says (timm accepts and ignores the argument), so every tensor loads at any
size -- nothing in the weights depends on it -- but timm's forward adds a 49 x 49 bias to the attention and runs
only where the last stage is 7 x 7 (193 to 224 px). Here the last stage reads its grid off its input (before it is
flattened to tokens) and passes it, as an argument, to its token blocks; each attention resizes its ``[heads, 7*7]``
table over ``|dy|, |dx|`` offsets to that grid as LeViT's are (cached per grid while the weights are unchanged).
At 7 x 7 every path is timm's own. An export runs in plain timm at 193 to 224 px only (timm builds 7 x 7 tables).
"""

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models import efficientformer as ef

from timm_anysize.core.family import NO_CONV_PATCH, DynamicPath, Family, TinyModel, gray_and_4ch, no_patch_change
from timm_anysize.core.intermediates import Intermediates
from timm_anysize.core.runtime_options import RuntimeOptions, runtime_options, set_runtime_options, swap_classes
from timm_anysize.families._shared import AttentionBiases

__all__ = ["FAMILIES", "DynamicAttention", "DynamicEfficientFormer", "enable_efficientformer_dynamic"]


class DynamicAttention(AttentionBiases, ef.Attention):
    """timm's EfficientFormer attention over the tokens of a ``res`` grid (its own 7 x 7 when none)."""

    def forward(self, x: torch.Tensor, res: Optional[List[int]] = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x)
        qkv = qkv.reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)

        attn = (q @ k.transpose(-2, -1)) * self.scale
        grid = [self.resolution[0], self.resolution[1]] if res is None else res
        attn = attn + self._anysize_biases(x, grid, 1)

        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.val_attn_dim)
        return self.proj(x)


class DynamicMetaBlock1d(ef.MetaBlock1d):
    def forward(self, x: torch.Tensor, res: Optional[List[int]] = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.token_mixer(self.norm1(x), res)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class DynamicMetaBlock2d(ef.MetaBlock2d):
    """timm's convolutional block, taking (and ignoring) a grid like the token blocks."""

    def forward(self, x: torch.Tensor, res: Optional[List[int]] = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.token_mixer(x)))
        return x + self.drop_path2(self.ls2(self.mlp(x)))


class DynamicFlat(ef.Flat):
    def forward(self, x: torch.Tensor, res: Optional[List[int]] = None) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class DynamicEfficientFormerStage(ef.EfficientFormerStage):
    """timm's stage with the grid of its (downsampled, still NCHW) input passed to every block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        res = [x.shape[-2], x.shape[-1]]
        for block in self.blocks:
            x = block(x, res)
        return x


class DynamicEfficientFormer(Intermediates, ef.EfficientFormer):
    """timm's EfficientFormer at any input size (set by :func:`timm_anysize.enable_dynamic`)."""

    intermediates_formats = ("NCHW",)
    intermediates_format_error = "Output shape must be NCHW."

    def _intermediates_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        x = self.stem(x)
        return x, [x.shape[-2], x.shape[-1]]  # the grid of the stage's input travels as the context

    def _intermediates_blocks(self) -> nn.Sequential:
        return self.stages

    def _intermediates_block(
        self, i: int, stage: nn.Module, x: torch.Tensor, grid: List[int]
    ) -> Tuple[torch.Tensor, List[int]]:
        x = stage(x)
        return x, ([x.shape[-2], x.shape[-1]] if i < self.num_stages - 1 else grid)  # the last one: tokens

    def _intermediates_feature(
        self, i: int, x: torch.Tensor, grid: List[int], norm: bool, output_fmt: str
    ) -> torch.Tensor:
        """The last stage's tokens laid out on the grid they came from (its input's, halved by its downsample,
        rounded up: timm halves the previous stage's grid, which is wrong where it is odd)."""
        if i < self.num_stages - 1:
            return x
        x = self.norm(x) if norm else x
        return x.reshape(x.shape[0], (grid[0] - 1) // 2 + 1, (grid[1] - 1) // 2 + 1, -1).permute(0, 3, 1, 2)

    def _intermediates_final(self, x: torch.Tensor, grid: List[int], last: bool) -> torch.Tensor:
        return self.norm(x) if last else x


_MODULES = {
    ef.Attention: DynamicAttention,
    ef.MetaBlock1d: DynamicMetaBlock1d,
    ef.MetaBlock2d: DynamicMetaBlock2d,
    ef.Flat: DynamicFlat,
    ef.EfficientFormerStage: DynamicEfficientFormerStage,
}


def enable_efficientformer_dynamic(model: nn.Module, options: RuntimeOptions) -> None:
    """Swap in the stage that passes its grid down and the blocks and attentions that take it."""
    options = runtime_options(model)
    for module in swap_classes(model, _MODULES):
        if isinstance(module, DynamicAttention):
            side = math.isqrt(module.attention_biases.shape[1])  # timm keeps no resolution: 7, from the table
            module.resolution = (side, side)
            if options is not None:
                set_runtime_options(module, options)  # its interpolation and bias cache


FAMILIES = (
    Family(
        name="efficientformer",
        classes=(ef.EfficientFormer,),
        tensors=(),  # timm builds the 7 x 7 tables at every img_size: every tensor loads as it is
        patch_embeds=(),
        unsupported=no_patch_change(NO_CONV_PATCH),
        static_unsupported=dict.fromkeys(
            ("img_larger", "img_non_square"),
            "timm's EfficientFormer builds its last stage's attention for a 7 x 7 grid (224 px) whatever img_size "
            "says, so its own forward fails at any other size; the dynamic path passes each input's grid down",
        ),
        dynamic_args=(),  # enable_dynamic passes the last stage's grid to its attentions
        dynamic_features=True,
        runtime=DynamicPath(
            classes={ef.EfficientFormer: DynamicEfficientFormer},
            setup=enable_efficientformer_dynamic,
            patch_layout="none",
        ),
        example="efficientformer_l1",
        tiny=TinyModel(
            dict(depths=(1, 1, 1, 2), embed_dims=(16, 16, 32, 32), num_vit=1),
            img_size=224,
            step=32,
            export_scale=1,  # timm's own runs only at 193-224 px (7x7 attention tables whatever img_size)
            conformance=gray_and_4ch((96, 160), 136),
            script_fx="",
            script_fx_note="its own module checks TorchScript, FX and export: tests/test_efficientformer_nest.py",
            train_built=(),
            train_note="timm's EfficientFormer builds its last stage's attention for a 7 x 7 grid whatever img_size "
            "(static_unsupported): only the dynamic forward runs other sizes",
        ),
    ),
)
