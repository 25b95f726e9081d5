"""GCViT (timm's ``gcvit``): one relative-position bias table per window attention, windows derived from img_size.

timm sizes each stage's window from the image (``img_size / window_ratio``, ratios 32, 32, 16, 32 by default) and
builds every attention's bias table for it; its global query is the stage's feature map max-pooled down to the
window. A load at another size resizes each table between the windows its attention has in the two models, with
timm's ``resize_rel_pos_bias_table`` (timm has no checkpoint filter or ``set_input_size`` for GCViT).

At run time (:func:`timm_anysize.enable_dynamic`) each block takes the window an image of the input's size gives
(``size / window_ratio``, the ratio read off the built model: its feature size x stride / window; timm keeps no
record of windows given explicitly, so one that is a whole fraction of the size scales like a derived one, and
only one that is not stays fixed), and its attention the bias for that window (the table resized as a
load resizes it, cached per window while the weights are unchanged, see :func:`~timm_anysize.families._shared.
rel_pos_bias_at`). The global query pools the map down to that window, as in a model built for the size: the
outputs are equal. Inputs are padded (bottom/right) to a multiple of the stride and the ratios. TorchScript
compiles the path (the tables resized by the scriptable port in :mod:`timm_anysize.core.resample`); FX records
each block as one leaf module.
"""

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import register_notrace_module
from timm.layers.pos_embed_rel import RelPosBias  # timm exports it from no shorter path
from timm.models import gcvit, maxxvit

from timm_anysize.core.cache import symbolic
from timm_anysize.core.family import (
    NO_CONV_PATCH,
    REL_TABLE,
    DynamicPath,
    Family,
    TinyModel,
    gray_and_4ch,
    no_patch_change,
)
from timm_anysize.core.intermediates import TimmIntermediates
from timm_anysize.core.padding import check_multiple, pad_to_multiple
from timm_anysize.core.runtime_options import RuntimeOptions, RuntimeOptionsMixin, runtime_options, swap_classes
from timm_anysize.core.spec import Size2
from timm_anysize.families._shared import DynamicRelPosBias

torch.fx.wrap("pad_to_multiple")  # a leaf of FX traces here too (fx.wrap patches this module's globals)

__all__ = ["FAMILIES", "DynamicGlobalContextVit", "enable_gcvit_dynamic", "gcvit_size_multiple"]


class DynamicWindowAttentionGlobal(gcvit.WindowAttentionGlobal):
    """timm's GCViT window attention with the bias of the window it is given (its own when none)."""

    def forward(
        self, x: torch.Tensor, q_global: Optional[torch.Tensor] = None, window: Optional[List[int]] = None
    ) -> torch.Tensor:
        B, N, C = x.shape
        if self.use_global and q_global is not None:
            kv = self.qkv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            k, v = kv.unbind(0)
            q = q_global.repeat_interleave(B // q_global.shape[0], dim=0)
            q = q.reshape(B, N, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        else:
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1).contiguous()
        attn = attn + self.rel_pos.bias_at([self.window_size[0], self.window_size[1]] if window is None else window)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class DynamicGlobalContextVitBlock(gcvit.GlobalContextVitBlock):
    """timm's GCViT block with the window of its input's size."""

    def _window_attn(self, x: torch.Tensor, q_global: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, H, W, C = x.shape
        ratio = self._anysize_ratio
        window = (
            [H * self._anysize_stride // ratio[0], W * self._anysize_stride // ratio[1]]
            if ratio[0]
            else [self.window_size[0], self.window_size[1]]
        )
        # (timm's maxxvit partition functions: the same steps as gcvit's, typed for a window that is a list)
        x_win = maxxvit.window_partition(x, window).view(-1, window[0] * window[1], C)
        attn_win = self.attn(x_win, q_global, window)
        return maxxvit.window_reverse(attn_win, window, [H, W])


register_notrace_module(DynamicGlobalContextVitBlock)  # FX: the window is read off the input's shape inside


def _ratio(block: nn.Module, stage: nn.Module, stride: int) -> Tuple[int, int]:
    """``img_size / window`` per axis of a block built from a window ratio, (0, 0) for a window given explicitly."""
    size = [f * stride for f in stage.feat_size]
    if all(s % w == 0 for s, w in zip(size, block.window_size)):
        return (size[0] // block.window_size[0], size[1] // block.window_size[1])
    return (0, 0)


def gcvit_size_multiple(model: nn.Module) -> int:
    """What input sizes must be a multiple of: the model's total stride and every stage's window ratio.

    Example:
        >>> import timm
        >>> gcvit_size_multiple(timm.create_model("gcvit_xxtiny", img_size=64, embed_dim=16))
        32
    """
    multiple = int(model.feature_info[-1]["reduction"])
    for i, stage in enumerate(model.stages):
        stride = int(model.feature_info[i]["reduction"])
        for block in stage.blocks:
            ratio = _ratio(block, stage, stride)
            multiple = math.lcm(multiple, *(r if r else stride * w for r, w in zip(ratio, block.window_size)))
    return multiple


class DynamicGlobalContextVit(RuntimeOptionsMixin, TimmIntermediates, gcvit.GlobalContextVit):
    """timm's GCViT at any input size (set by :func:`timm_anysize.enable_dynamic`)."""

    def _anysize_input(self, x: torch.Tensor) -> torch.Tensor:
        multiple = self._anysize_multiple
        if not self.anysize_options().pad and not torch.jit.is_scripting():
            self._anysize_check(x, multiple)
        return pad_to_multiple(x, [multiple, multiple])

    @torch.jit.unused
    def _anysize_check(self, x: torch.Tensor, multiple: int) -> None:
        """Padding off: refuse an input off the windows (a scripted model pads; FX records no size check)."""
        if not symbolic(x):
            check_multiple(x.shape[-2:], (multiple, multiple), what="this GCViT's windows")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(self._anysize_input(x)))


def enable_gcvit_dynamic(model: nn.Module, options: RuntimeOptions) -> None:
    """Swap in the blocks and attentions that take their input's window, and cache tables per window (what
    :func:`timm_anysize.enable_dynamic` runs for a GCViT).

    Example:
        >>> import timm, timm_anysize
        >>> m = timm_anysize.enable_dynamic(timm.create_model("gcvit_xxtiny", img_size=64, embed_dim=16).eval())
        >>> m(torch.randn(1, 3, 96, 64)).shape
        torch.Size([1, 1000])
    """
    model._anysize_multiple = gcvit_size_multiple(model)
    for i, stage in enumerate(model.stages):
        stride = int(model.feature_info[i]["reduction"])
        for block in stage.blocks:
            if type(block) is gcvit.GlobalContextVitBlock:
                block._anysize_ratio, block._anysize_stride = _ratio(block, stage, stride), stride
                block.__class__ = DynamicGlobalContextVitBlock
            if type(block.attn) is gcvit.WindowAttentionGlobal:
                block.attn.__class__ = DynamicWindowAttentionGlobal
    swap_classes(model, {RelPosBias: DynamicRelPosBias}, runtime_options(model))  # with a table cache each


def _size_multiples(model: nn.Module, img_size: Size2) -> Tuple[Tuple[str, Size2, Size2], ...]:
    multiple = gcvit_size_multiple(model)
    return (("the stages' halvings and windows", img_size, (multiple, multiple)),)


FAMILIES = (
    Family(
        name="gcvit",
        classes=(gcvit.GlobalContextVit,),
        tensors=REL_TABLE,
        patch_embeds=(),
        unsupported=no_patch_change(NO_CONV_PATCH),
        dynamic_args=(),  # enable_dynamic gives every block its input's window
        runtime=DynamicPath(
            classes={gcvit.GlobalContextVit: DynamicGlobalContextVit},
            setup=enable_gcvit_dynamic,
            patch_layout="none",
        ),
        size_multiples=_size_multiples,
        export_note="each window's bias table is resized by timm's interpolation over an offset grid computed in "
        "Python from the window size, which torch.export specializes to the example input's size",
        example="gcvit_xxtiny",
        tiny=TinyModel(
            dict(embed_dim=16, mlp_ratio=1.0),
            step=32,  # (gcvit_xxtiny fixes depths and heads)
            conformance=gray_and_4ch((64, 96), 160),
            multiple=32,
            script_fx="",
            script_fx_note="its own module checks TorchScript, FX and export: tests/test_family_maxxvit_gcvit.py",
        ),
    ),
)
