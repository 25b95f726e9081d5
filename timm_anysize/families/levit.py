"""LeViT at any input size: attention biases and token reshapes for the resolutions the input gives each stage.

timm's LeViT builds every attention's bias index (and every subsampling reshape) for one resolution per stage. Here
the resolutions of the current forward (from the stem's output, halved per stage as timm computes them) reach the
modules through a context variable, so threads running different sizes at once do not interfere. Each attention's
biases over ``|dy|, |dx|`` offsets are resized to the stage's resolution as a load at that size resizes them, and
cached per resolution while the weights are unchanged. At the model's own size every path is timm's own.
"""

from __future__ import annotations

import contextvars
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import ndgrid
from timm.models import levit

from ..cache import PosEmbedCache, must_run_inline
from ..intermediates import IntermediatesAtOwnSize
from ..resample import resize_bias_grid
from ..spec import Size2
from ..family import NO_CONV_PATCH, DynamicPath, Family, no_patch_change

__all__ = ["FAMILIES", "DynamicLevit", "DynamicLevitDistilled", "enable_levit_dynamic"]

_LEVELS: contextvars.ContextVar[Optional[tuple[Size2, ...]]] = contextvars.ContextVar("anysize_levit", default=None)


def _resolution(module: nn.Module) -> tuple[int, int]:
    """The resolution ``module`` works at in the current forward (its own outside a dynamic forward)."""
    levels = _LEVELS.get()
    return tuple(module.resolution) if levels is None else levels[module._anysize_level]  # type: ignore[return-value]


def _bias_index(resolution: Size2, stride: int, device: torch.device) -> torch.Tensor:
    """timm's index of |dy| * W + |dx| between query positions (every ``stride``-th) and key positions."""
    k_pos = torch.stack(ndgrid(torch.arange(resolution[0], device=device), torch.arange(resolution[1], device=device)))
    q_pos = torch.stack(ndgrid(torch.arange(0, resolution[0], stride, device=device),
                               torch.arange(0, resolution[1], stride, device=device)))
    rel = (q_pos.flatten(1)[..., :, None] - k_pos.flatten(1)[..., None, :]).abs()
    return rel[0] * resolution[1] + rel[1]


def _biases(module: nn.Module, device: torch.device, stride: int) -> Optional[torch.Tensor]:
    """The biases for the current resolution, or None where timm's own (its resolution) apply."""
    res = _resolution(module)
    if res == tuple(module.resolution):
        return None
    biases = module.attention_biases

    def compute() -> torch.Tensor:
        resized = resize_bias_grid(biases, tuple(module.resolution), res, module._anysize_dynamic.interpolation)
        return resized[:, _bias_index(res, stride, device)]

    if must_run_inline(biases):
        return compute()
    key = (res, biases.dtype, device, torch.is_inference_mode_enabled())
    return module._anysize_bias_cache.get_or_compute(key, biases, lambda: compute().detach())


class DynamicAttention(levit.Attention):
    def get_attention_biases(self, device: torch.device) -> torch.Tensor:
        out = _biases(self, device, 1)
        return super().get_attention_biases(device) if out is None else out


class DynamicAttentionDownsample(levit.AttentionDownsample):
    def get_attention_biases(self, device: torch.device) -> torch.Tensor:
        out = _biases(self, device, self.stride)
        return super().get_attention_biases(device) if out is None else out


class DynamicDownsample(levit.Downsample):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        x = x.view(B, *_resolution(self), C)
        if self.pool is not None:
            x = self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        else:
            x = x[:, ::self.stride, ::self.stride]
        return x.reshape(B, -1, C)


class _DynamicLevitFeatures:
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        levels = [tuple(x.shape[-2:])]
        for _ in self.stages[1:]:
            levels.append(tuple((r - 1) // 2 + 1 for r in levels[-1]))  # timm's stage stride 2
        if not self.use_conv:
            x = x.flatten(2).transpose(1, 2)
        token = _LEVELS.set(tuple(levels))
        try:
            return self.stages(x)
        finally:
            _LEVELS.reset(token)


class DynamicLevit(IntermediatesAtOwnSize, _DynamicLevitFeatures, levit.Levit):
    """timm's LeViT at any input size (set by :func:`timm_anysize.enable_dynamic`)."""


class DynamicLevitDistilled(IntermediatesAtOwnSize, _DynamicLevitFeatures, levit.LevitDistilled):
    """timm's distilled LeViT at any input size."""


_MODULES = {
    levit.Attention: DynamicAttention,
    levit.AttentionDownsample: DynamicAttentionDownsample,
    levit.Downsample: DynamicDownsample,
}


def enable_levit_dynamic(model: nn.Module, cache_size: int) -> None:
    """Swap in the dynamic module classes and tag each module with the stage level whose resolution it uses."""
    for i, stage in enumerate(model.stages):
        for part, level in ((stage.downsample, i - 1), (stage.blocks, i)):
            for module in part.modules():
                dynamic_cls = _MODULES.get(type(module))
                if dynamic_cls is None:
                    continue
                module.__class__ = dynamic_cls
                module._anysize_level = level
                module._anysize_dynamic = model._anysize_dynamic
                if hasattr(module, "attention_biases"):
                    module._anysize_bias_cache = PosEmbedCache(cache_size)


FAMILIES = (
    Family(
        name="levit",
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
        example="levit_128s",
    ),
)
