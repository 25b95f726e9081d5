"""LeViT at any input size: attention biases and token reshapes for the resolutions the input gives each stage.

timm's LeViT builds every attention's bias index (and every subsampling reshape) for one resolution per stage. Here
the model computes the resolution of each stage from the stem's output (halved per stage as timm computes it) and
passes it down, as an argument, to the stage, its blocks and their attentions (so threads running different sizes
at once do not interfere, and TorchScript and FX see plain arguments). Each attention's biases over ``|dy|, |dx|``
offsets are resized to the stage's resolution as a load at that size resizes them, and cached per resolution while
the weights are unchanged (eager mode). A module called without a resolution works at its own (conv LeViT: at its
input's). At the model's own size every path is timm's own.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models import levit

from timm_anysize.core.family import NO_CONV_PATCH, DynamicPath, Family, TinyModel, gray_and_4ch, no_patch_change
from timm_anysize.core.intermediates import Intermediates
from timm_anysize.core.runtime_options import RuntimeOptions, runtime_options, set_runtime_options, swap_classes
from timm_anysize.families._shared import AttentionBiases

__all__ = ["FAMILIES", "DynamicLevit", "DynamicLevitDistilled", "enable_levit_dynamic"]


class DynamicAttention(AttentionBiases, levit.Attention):
    """timm's LeViT attention at the resolution it is given (its own when none)."""

    __constants__ = ["use_conv"]

    def forward(self, x: torch.Tensor, res: Optional[List[int]] = None) -> torch.Tensor:
        if self.use_conv:
            B, C, H, W = x.shape
            biases = self._anysize_biases(x, [H, W], 1)
            q, k, v = (
                self.qkv(x).view(B, self.num_heads, -1, H * W).split([self.key_dim, self.key_dim, self.val_dim], dim=2)
            )
            attn = (q.transpose(-2, -1) @ k) * self.scale + biases
            attn = attn.softmax(dim=-1)
            x = (v @ attn.transpose(-2, -1)).view(B, -1, H, W)
        else:
            B, N, C = x.shape
            biases = self._anysize_biases(x, [self.resolution[0], self.resolution[1]] if res is None else res, 1)
            q, k, v = (
                self.qkv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
            )
            q = q.permute(0, 2, 1, 3)
            k = k.permute(0, 2, 3, 1)
            v = v.permute(0, 2, 1, 3)
            attn = q @ k * self.scale + biases
            attn = attn.softmax(dim=-1)
            x = (attn @ v).transpose(1, 2).reshape(B, N, self.val_attn_dim)
        return self.proj(x)


class DynamicAttentionDownsample(AttentionBiases, levit.AttentionDownsample):
    """timm's LeViT subsampling attention at the resolution it is given (its own when none)."""

    __constants__ = ["use_conv"]

    def forward(self, x: torch.Tensor, res: Optional[List[int]] = None) -> torch.Tensor:
        if self.use_conv:
            B, C, H, W = x.shape
            HH, WW = (H - 1) // self.stride + 1, (W - 1) // self.stride + 1
            biases = self._anysize_biases(x, [H, W], self.stride)
            k, v = self.kv(x).view(B, self.num_heads, -1, H * W).split([self.key_dim, self.val_dim], dim=2)
            q = self.q(x).view(B, self.num_heads, self.key_dim, -1)
            attn = (q.transpose(-2, -1) @ k) * self.scale + biases
            attn = attn.softmax(dim=-1)
            x = (v @ attn.transpose(-2, -1)).reshape(B, self.val_attn_dim, HH, WW)
        else:
            B, N, C = x.shape
            res = [self.resolution[0], self.resolution[1]] if res is None else res
            biases = self._anysize_biases(x, res, self.stride)
            k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
            k = k.permute(0, 2, 3, 1)  # BHCN
            v = v.permute(0, 2, 1, 3)  # BHNC
            q = self.q.ln(self.q.down(x, res)).view(B, -1, self.num_heads, self.key_dim).permute(0, 2, 1, 3)
            attn = q @ k * self.scale + biases
            attn = attn.softmax(dim=-1)
            x = (attn @ v).transpose(1, 2).reshape(B, -1, self.val_attn_dim)
        return self.proj(x)


class DynamicDownsample(levit.Downsample):
    """timm's token subsampling of a ``res`` grid (its own resolution when none)."""

    def forward(self, x: torch.Tensor, res: Optional[List[int]] = None) -> torch.Tensor:
        B, N, C = x.shape
        if res is None:
            res = [self.resolution[0], self.resolution[1]]
        x = x.view(B, res[0], res[1], C)
        if self.pool is not None:
            x = self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        else:
            x = x[:, :: self.stride, :: self.stride]
        return x.reshape(B, -1, C)


class DynamicLevitDownsample(levit.LevitDownsample):
    def forward(self, x: torch.Tensor, res: Optional[List[int]] = None) -> torch.Tensor:
        x = self.attn_downsample(x, res)
        return x + self.drop_path(self.mlp(x))


class NoDownsample(nn.Identity):
    """The first stage's ``nn.Identity`` downsample, taking (and ignoring) a resolution like the others."""

    def forward(self, x: torch.Tensor, res: Optional[List[int]] = None) -> torch.Tensor:
        return x


class DynamicLevitBlock(levit.LevitBlock):
    def forward(self, x: torch.Tensor, res: Optional[List[int]] = None) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(x, res))
        return x + self.drop_path2(self.mlp(x))


class DynamicLevitStage(levit.LevitStage):
    """timm's stage given its input's resolution: the downsample at it, the blocks at the subsampled one."""

    def forward(self, x: torch.Tensor, res: Optional[List[int]] = None) -> torch.Tensor:
        if res is None:  # its own resolution (conv LeViT: its input's)
            res = [x.shape[-2], x.shape[-1]] if self._anysize_conv else self._anysize_res
        x = self.downsample(x, res)
        s = self._anysize_stride
        res = [(res[0] - 1) // s + 1, (res[1] - 1) // s + 1]
        for block in self.blocks:
            x = block(x, res)
        return x


class _DynamicLevitFeatures(Intermediates):
    """LeViT's features at the resolution of the input (and :class:`Intermediates`' hooks)."""

    intermediates_formats = ("NCHW",)
    intermediates_format_error = "Output shape must be NCHW."

    def _anysize_stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        x = self.stem(x)
        res = [x.shape[-2], x.shape[-1]]
        if not self.use_conv:
            x = x.flatten(2).transpose(1, 2)
        return x, res

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, res = self._anysize_stem(x)
        for stage in self.stages:
            x = stage(x, res)
            s = stage._anysize_stride
            res = [(res[0] - 1) // s + 1, (res[1] - 1) // s + 1]
        return x

    def _intermediates_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        return self._anysize_stem(x)  # the resolution travels as the context

    def _intermediates_blocks(self) -> nn.Sequential:
        return self.stages

    def _intermediates_block(
        self, i: int, stage: nn.Module, x: torch.Tensor, res: List[int]
    ) -> Tuple[torch.Tensor, List[int]]:
        x = stage(x, res)
        s = stage._anysize_stride
        return x, [(res[0] - 1) // s + 1, (res[1] - 1) // s + 1]

    def _intermediates_feature(
        self, i: int, x: torch.Tensor, res: List[int], norm: bool, output_fmt: str
    ) -> torch.Tensor:
        """The stage's output at its resolution (timm has no final norm to apply)."""
        return x if self.use_conv else x.reshape(x.shape[0], res[0], res[1], -1).permute(0, 3, 1, 2)

    def _intermediates_final(self, x: torch.Tensor, res: List[int], last: bool) -> torch.Tensor:
        return x


class DynamicLevit(_DynamicLevitFeatures, levit.Levit):
    """timm's LeViT at any input size (set by :func:`timm_anysize.enable_dynamic`)."""


class DynamicLevitDistilled(_DynamicLevitFeatures, levit.LevitDistilled):
    """timm's distilled LeViT at any input size."""


_MODULES = {
    levit.Attention: DynamicAttention,
    levit.AttentionDownsample: DynamicAttentionDownsample,
    levit.Downsample: DynamicDownsample,
    levit.LevitDownsample: DynamicLevitDownsample,
    levit.LevitBlock: DynamicLevitBlock,
    levit.LevitStage: DynamicLevitStage,
}


def enable_levit_dynamic(model: nn.Module, options: RuntimeOptions) -> None:
    """Swap in the module classes that take a resolution, and give each stage its own (for calls without one)."""
    options = runtime_options(model)
    for module in swap_classes(model, _MODULES):
        if hasattr(module, "attention_biases") and options is not None:
            set_runtime_options(module, options)  # its interpolation and bias cache
    for stage in model.stages:
        down = stage.downsample
        if type(down) is nn.Identity:
            down.__class__ = NoDownsample
            first = stage.blocks[0].attn
            stage._anysize_res, stage._anysize_stride = [first.resolution[0], first.resolution[1]], 1
        else:
            attn = down.attn_downsample
            stage._anysize_res, stage._anysize_stride = [attn.resolution[0], attn.resolution[1]], attn.stride
        stage._anysize_conv = bool(model.use_conv)


FAMILIES = (
    Family(
        name="levit",
        dynamic_features=True,
        classes=(levit.Levit, levit.LevitDistilled),
        tensors=(("*attention_biases", "bias_grid"),),
        patch_embeds=(),
        unsupported=no_patch_change(NO_CONV_PATCH),
        dynamic_args=(),  # enable_dynamic gives each stage the resolution of the input
        runtime=DynamicPath(
            classes={levit.Levit: DynamicLevit, levit.LevitDistilled: DynamicLevitDistilled},
            setup=enable_levit_dynamic,
            patch_layout="none",
        ),
        export_note="torch.export keeps a guard from the example input's stage resolutions (e.g. width >= 65), so "
        "the exported program refuses smaller inputs; torch.compile(dynamic=True) recompiles where a guard fails "
        "instead (tested at three sizes)",
        example="levit_128s",
        tiny=TinyModel(
            dict(embed_dim=(32, 48, 64), depth=(1, 1, 1), num_heads=(1, 1, 1), key_dim=8),
            script_fx="windows",
            conformance=gray_and_4ch((64, 96), 136),
        ),
    ),
)
