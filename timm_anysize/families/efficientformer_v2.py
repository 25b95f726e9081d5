"""EfficientFormerV2 at any size: attention biases sized by each attention's resolution, resampled like LeViT's.

timm builds every attention of the last two stages for one resolution (``ceil(img_size / 32)`` for the strided
attentions of stage 2 and the blocks of stage 3, ``ceil(img_size / 16)`` for stage 3's subsampling attention) and
gives it a ``[heads, H*W]`` table of biases over ``|dy|, |dx|`` offsets. A load at another size resizes each table
to its module's resolution (``bias_grid``, as for LeViT); at run time each attention reads its resolution off its
input (the blocks are convolutional, NCHW throughout), resizes its table to it (cached per resolution while the
weights are unchanged) and upsamples back to its input's size. At the model's own size every path is timm's own.

timm's strided attention upsamples by exactly 2, so a model whose stage-2 feature map is odd (``ceil(img_size / 16)``
odd: 80 px, 144 px) fails in timm's own forward; a variant's own size must avoid that (``size_multiples``), while the
dynamic path upsamples to its input's size and runs there too.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import FeatureListNet
from timm.models import efficientformer_v2 as efv2

from timm_anysize.core.family import NO_CONV_PATCH, DynamicPath, Family, TinyModel, gray_and_4ch, no_patch_change
from timm_anysize.core.runtime_options import RuntimeOptions, runtime_options, swap_classes
from timm_anysize.core.spec import Size2
from timm_anysize.families._shared import AttentionBiases

__all__ = ["FAMILIES", "DynamicAttention2d", "DynamicAttention2dDownsample", "enable_efficientformer_v2_dynamic"]


class DynamicAttention2d(AttentionBiases, efv2.Attention2d):
    """timm's EfficientFormerV2 attention at the resolution of its input (its own biases at its own)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if self.stride_conv is not None:
            x = self.stride_conv(x)
        h, w = x.shape[-2], x.shape[-1]
        n = h * w
        q = self.q(x).reshape(B, self.num_heads, -1, n).permute(0, 1, 3, 2)
        k = self.k(x).reshape(B, self.num_heads, -1, n).permute(0, 1, 2, 3)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.reshape(B, self.num_heads, -1, n).permute(0, 1, 3, 2)

        attn = (q @ k) * self.scale
        attn = attn + self._anysize_biases(x, [h, w], 1)
        attn = self.talking_head1(attn)
        attn = attn.softmax(dim=-1)
        attn = self.talking_head2(attn)

        x = (attn @ v).transpose(2, 3)
        x = x.reshape(B, self.dh, h, w) + v_local
        if self.upsample is not None:
            # back to the input's size (timm's x2 where that is the input's size: an odd map comes back odd)
            x = F.interpolate(x, size=[H, W], mode="bilinear", align_corners=False)
        x = self.act(x)
        return self.proj(x)


class DynamicAttention2dDownsample(AttentionBiases, efv2.Attention2dDownsample):
    """timm's EfficientFormerV2 subsampling attention: keys at its input's resolution, queries at every 2nd."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        n = H * W
        q = self.q(x)
        h2, w2 = q.shape[-2], q.shape[-1]
        q = q.reshape(B, self.num_heads, -1, h2 * w2).permute(0, 1, 3, 2)
        k = self.k(x).reshape(B, self.num_heads, -1, n).permute(0, 1, 2, 3)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.reshape(B, self.num_heads, -1, n).permute(0, 1, 3, 2)

        attn = (q @ k) * self.scale
        attn = attn + self._anysize_biases(x, [H, W], 2)
        attn = attn.softmax(dim=-1)

        x = (attn @ v).transpose(2, 3)
        x = x.reshape(B, self.dh, h2, w2) + v_local
        x = self.act(x)
        return self.proj(x)


_MODULES = {efv2.Attention2d: DynamicAttention2d, efv2.Attention2dDownsample: DynamicAttention2dDownsample}


def enable_efficientformer_v2_dynamic(model: nn.Module, options: RuntimeOptions) -> None:
    """Swap in the attentions that read their resolution off their input, each with the model's run-time options
    (interpolation) and its own bias cache."""
    swap_classes(model, _MODULES, runtime_options(model))


def _enable_features(model: nn.Module, pad: bool) -> None:
    """A ``features_only`` wrapper (timm flattens the stages into it): the same attentions, bicubic (the default
    interpolation: timm's enabler interface passes none), the default cache size. ``pad``: nothing to pad."""
    swap_classes(model, _MODULES, RuntimeOptions(pad=pad))
    model.dynamic_img_size = True


def _claims(model: nn.Module) -> bool:
    """A ``features_only`` wrapper of an EfficientFormerV2 (the full model swaps its class instead); with the late
    stages pruned it holds no attention, and runs at any size as its convolutions do."""
    return type(model) is FeatureListNet and any(type(m) is efv2.EfficientFormerV2Stage for m in model.children())


def _strided_attention_sizes(model: nn.Module, img_size: Size2) -> tuple[tuple[str, Size2, Size2], ...]:
    """Stage 2's strided attentions upsample their half-size map by exactly 2: its map must be even."""
    if len(model.stages) < 3 or not any(getattr(b, "token_mixer", None) is not None for b in model.stages[2].blocks):
        return ()
    grid = tuple(math.ceil(s / 16) for s in img_size)  # stem /4, stages 1 and 2 halve (ceil)
    return (("stage 2's strided attention (upsampled x2 to its input)", grid, (2, 2)),)  # type: ignore[return-value]


FAMILIES = (
    Family(
        name="efficientformer_v2",
        classes=(efv2.EfficientFormerV2,),
        tensors=(("*attention_biases", "bias_grid"),),
        patch_embeds=(),
        unsupported=no_patch_change(NO_CONV_PATCH),
        dynamic_args=(),  # enable_dynamic swaps the attentions for ones that read the input's resolution
        dynamic_features=True,
        runtime=DynamicPath(
            classes={efv2.EfficientFormerV2: efv2.EfficientFormerV2},
            setup=enable_efficientformer_v2_dynamic,
            patch_layout="none",
            enable=_enable_features,
            claims=_claims,
        ),
        size_multiples=_strided_attention_sizes,
        example="efficientformerv2_s0",
        tiny=TinyModel(
            dict(depths=(1, 1, 2, 2), embed_dims=(16, 16, 32, 32), num_vit=1, mlp_ratios=2),
            step=32,
            conformance=gray_and_4ch((64, 96), 128),
            script_fx="",
            script_fx_note="its own module checks TorchScript, FX and export: tests/test_efficientformer_nest.py",
        ),  # attention in stages 2 and 3, stage 3's subsampling
    ),
)
