"""MaxViT, CoAtNet and MaxxViT (timm's ``maxxvit``): relative-position biases tied to the partition sizes.

timm derives each MaxViT block's window and grid partition from the image size (``img_size / partition_ratio``,
32 by default) and each CoAtNet transformer stage's window from its whole feature map, and builds one bias table
per attention for it (``rel_pos_type`` ``bias``: a flat ``[(2Wh-1)(2Ww-1), heads]`` table; ``bias_tf``: a
``[heads, 2Wh-1, 2Ww-1]`` table; ``mlp``: an MLP over log coordinates, nothing to resize). A load at another size
resizes each table between the windows its attention has in the two models, as timm's own ``set_input_size`` does.

At run time (:func:`timm_anysize.enable_dynamic`) each partition attention takes the partition an image of the
input's size gives (``size / partition_ratio``; read off its own feature map, which is ``size / stride``), and each
attention its bias for that window: the table resized exactly as a load at that size resizes it (timm's
``resize_rel_pos_bias_table``, then its index or lookup), cached per window while the weights are unchanged
(eager, no gradient), or the MLP run over that window's coordinates. The outputs equal those of a model built for
the size with the resized weights. Sizes that do not split into whole windows are padded (bottom/right) to the
nearest that do (``pad``); at the model's own size every path is timm's own.

TorchScript compiles the same path, with scriptable ports of timm's table resize, index, lookup and log coordinates
(:func:`~timm_anysize.families._shared.table_bias`: the same values, bit for bit); FX records every partition
attention (and CoAtNet's attentions) as one leaf module, whose window is read off its input, and the padding as
one leaf function.
"""

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module
from timm.layers.pos_embed_rel import RelPosBias, RelPosBiasTf, RelPosMlp  # timm exports these from no shorter path
from timm.models import maxxvit

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
from timm_anysize.core.runtime_options import (
    RuntimeOptions,
    RuntimeOptionsMixin,
    runtime_options,
    set_runtime_options,
    swap_classes,
)
from timm_anysize.core.spec import Size2
from timm_anysize.families._shared import DynamicRelPosBias, DynamicRelPosBiasTf, DynamicRelPosMlp

torch.fx.wrap("pad_to_multiple")  # a leaf of plain FX traces here too (fx.wrap patches this module's globals)

__all__ = [
    "FAMILIES",
    "DynamicMaxxVit",
    "enable_maxxvit_dynamic",
    "maxxvit_size_multiple",
]


_REL_POS: dict[type, type] = {
    RelPosBias: DynamicRelPosBias,
    RelPosBiasTf: DynamicRelPosBiasTf,
    RelPosMlp: DynamicRelPosMlp,
}


class DynamicAttention2d(maxxvit.Attention2d):
    """timm's NCHW attention with its bias at the window of its input (CoAtNet: the whole map; MaxViT-NCHW: a
    partition)."""

    def forward(self, x: torch.Tensor, shared_rel_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, C, H, W = x.shape
        if self.head_first:
            q, k, v = self.qkv(x).view(B, self.num_heads, self.dim_head * 3, -1).chunk(3, dim=2)
        else:
            q, k, v = self.qkv(x).reshape(B, 3, self.num_heads, self.dim_head, -1).unbind(1)
        bias = shared_rel_pos
        if self.rel_pos is not None:
            bias = self.rel_pos.bias_at([H, W])
        if self.fused_attn:
            x = (
                F.scaled_dot_product_attention(
                    q.transpose(-1, -2).contiguous(),
                    k.transpose(-1, -2).contiguous(),
                    v.transpose(-1, -2).contiguous(),
                    attn_mask=bias,
                    dropout_p=self.attn_drop.p if self.training else 0.0,
                )
                .transpose(-1, -2)
                .reshape(B, -1, H, W)
            )
        else:
            q = q * self.scale
            attn = q.transpose(-2, -1) @ k
            if bias is not None:
                attn = attn + bias
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = (v @ attn.transpose(-2, -1)).view(B, -1, H, W)
        return self.proj_drop(self.proj(x))


class DynamicAttentionCl(maxxvit.AttentionCl):
    """timm's channels-last attention on partitions ``[B * n, h, w, C]``, with its bias at the partition's window."""

    def forward(self, x: torch.Tensor, shared_rel_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        B = x.shape[0]
        restore_shape = x.shape[:-1]
        if self.head_first:
            q, k, v = self.qkv(x).view(B, -1, self.num_heads, self.dim_head * 3).transpose(1, 2).chunk(3, dim=3)
        else:
            q, k, v = self.qkv(x).reshape(B, -1, 3, self.num_heads, self.dim_head).transpose(1, 3).unbind(2)
        bias = shared_rel_pos
        if self.rel_pos is not None:
            bias = self.rel_pos.bias_at([x.shape[1], x.shape[2]])
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(restore_shape + (-1,))
        return self.proj_drop(self.proj(x))


class _Partition:
    def _anysize_partition(self, h: int, w: int) -> List[int]:
        """The partition an image of the size giving this ``h x w`` feature map gives (``size / partition_ratio``),
        or the module's own fixed one (partitions given explicitly)."""
        ratio = self._anysize_ratio
        if ratio == 0:
            return [self.partition_size[0], self.partition_size[1]]
        return [h * self._anysize_stride // ratio, w * self._anysize_stride // ratio]


class DynamicPartitionAttentionCl(_Partition, maxxvit.PartitionAttentionCl):
    """timm's window / grid attention (NHWC) with the partition of its input's size."""

    def _partition_attn(self, x: torch.Tensor) -> torch.Tensor:
        img_size = x.shape[1:3]
        size = self._anysize_partition(x.shape[1], x.shape[2])
        if self.partition_block:
            return maxxvit.window_reverse(self.attn(maxxvit.window_partition(x, size)), size, img_size)
        return maxxvit.grid_reverse(self.attn(maxxvit.grid_partition(x, size)), size, img_size)


class DynamicPartitionAttention2d(_Partition, maxxvit.PartitionAttention2d):
    """timm's window / grid attention (NCHW) with the partition of its input's size."""

    def _partition_attn(self, x: torch.Tensor) -> torch.Tensor:
        img_size = x.shape[-2:]
        size = self._anysize_partition(x.shape[-2], x.shape[-1])
        if self.partition_block:
            return maxxvit.window_reverse_nchw(self.attn(maxxvit.window_partition_nchw(x, size)), size, img_size)
        return maxxvit.grid_reverse_nchw(self.attn(maxxvit.grid_partition_nchw(x, size)), size, img_size)


class DynamicParallelPartitionAttention(_Partition, maxxvit.ParallelPartitionAttention):
    """timm's parallel window + grid attention with the partition of its input's size."""

    def _partition_attn(self, x: torch.Tensor) -> torch.Tensor:
        img_size = x.shape[1:3]
        size = self._anysize_partition(x.shape[1], x.shape[2])
        x_window = maxxvit.window_reverse(self.attn_block(maxxvit.window_partition(x, size)), size, img_size)
        x_grid = maxxvit.grid_reverse(self.attn_grid(maxxvit.grid_partition(x, size)), size, img_size)
        return torch.cat([x_window, x_grid], dim=-1)


_PARTITIONS: dict[type, type] = {
    maxxvit.PartitionAttentionCl: DynamicPartitionAttentionCl,
    maxxvit.PartitionAttention2d: DynamicPartitionAttention2d,
    maxxvit.ParallelPartitionAttention: DynamicParallelPartitionAttention,
}
_ATTENTIONS: dict[type, type] = {maxxvit.Attention2d: DynamicAttention2d, maxxvit.AttentionCl: DynamicAttentionCl}
for _cls in (*_PARTITIONS.values(), *_ATTENTIONS.values()):
    register_notrace_module(_cls)  # FX: sizes are read off shapes inside; each is one leaf


def maxxvit_size_multiple(model: nn.Module) -> int:
    """What input sizes must be a multiple of: the model's total stride (its downsampling shortcuts and CoAtNet's
    whole-map tables need whole halvings), the partition ratio for partitions derived from the size, stride x
    partition for fixed ones.

    Example:
        >>> import timm
        >>> maxxvit_size_multiple(timm.create_model("test_maxvit"))
        32
    """
    multiple = int(model.feature_info[-1]["reduction"])
    for module in model.modules():
        if isinstance(module, tuple(_PARTITIONS) + tuple(_PARTITIONS.values())):
            stride, ratio = _module_stride(model, module), getattr(model, "partition_ratio", 32)
            if _derived(model, module):
                multiple = math.lcm(multiple, stride, ratio)
            else:
                multiple = math.lcm(multiple, *(stride * p for p in module.partition_size))
    return multiple


def _module_stride(model: nn.Module, module: nn.Module) -> int:
    """The stride of the feature map a partition attention works on (its stage's output stride)."""
    for i, stage in enumerate(model.stages):
        if any(m is module for m in stage.modules()):
            return int(model.feature_info[i + 1]["reduction"])
    raise ValueError(f"{type(module).__name__} is in no stage of the model")


def _derived(model: nn.Module, module: nn.Module) -> bool:
    """Whether the module's partition is timm's default for the model's img_size (not given explicitly)."""
    ratio = getattr(model, "partition_ratio", 32)
    return tuple(module.partition_size) == tuple(s // ratio for s in model.img_size)


class DynamicMaxxVit(RuntimeOptionsMixin, TimmIntermediates, maxxvit.MaxxVit):
    """timm's MaxxVit at any input size (set by :func:`timm_anysize.enable_dynamic`): the input padded to whole
    partitions where needed, every partition attention at its input's partition."""

    def _anysize_input(self, x: torch.Tensor) -> torch.Tensor:
        multiple = self._anysize_multiple
        if multiple > 1:
            if not self.anysize_options().pad and not torch.jit.is_scripting():
                self._anysize_check(x, multiple)
            x = pad_to_multiple(x, [multiple, multiple])
        return x

    @torch.jit.unused
    def _anysize_check(self, x: torch.Tensor, multiple: int) -> None:
        """Padding off: refuse an input off the partitions (a scripted model pads; FX records no size check)."""
        if not symbolic(x):
            check_multiple(x.shape[-2:], (multiple, multiple), what="this MaxxViT's window and grid partitions")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self._anysize_input(x))
        x = self.stages(x)
        return self.norm(x)


def enable_maxxvit_dynamic(model: nn.Module, options: RuntimeOptions) -> None:
    """Swap in the attention and partition classes that take their input's window, and cache tables per window
    (what :func:`timm_anysize.enable_dynamic` runs for a MaxxViT).

    Example:
        >>> import timm, timm_anysize
        >>> m = timm_anysize.enable_dynamic(timm.create_model("test_maxvit").eval())  # built for 160 px
        >>> m(torch.randn(1, 3, 96, 64)).shape
        torch.Size([1, 1000])
    """
    options = runtime_options(model)
    for module in swap_classes(model, {**_PARTITIONS, **_ATTENTIONS, **_REL_POS}):
        if isinstance(module, _Partition):
            module._anysize_stride = _module_stride(model, module)
            module._anysize_ratio = int(model.partition_ratio) if _derived(model, module) else 0
        elif isinstance(module, tuple(_REL_POS.values())) and options is not None:
            set_runtime_options(module, options)  # a table cache per window
    model._anysize_multiple = maxxvit_size_multiple(model)


def _size_multiples(model: nn.Module, img_size: Size2) -> Tuple[Tuple[str, Size2, Size2], ...]:
    multiple = maxxvit_size_multiple(model)
    return (("the stages' halvings and window / grid partitions", img_size, (multiple, multiple)),)


FAMILIES = (
    Family(
        name="maxxvit",
        classes=(maxxvit.MaxxVit,),
        checkpoint_filter=maxxvit.checkpoint_filter_fn,
        tensors=REL_TABLE,
        patch_embeds=(),
        unsupported=no_patch_change(NO_CONV_PATCH),
        dynamic_args=(),  # enable_dynamic gives every attention its input's window
        runtime=DynamicPath(
            classes={maxxvit.MaxxVit: DynamicMaxxVit},
            setup=enable_maxxvit_dynamic,
            patch_layout="none",
        ),
        size_multiples=_size_multiples,
        export_note="each partition's bias table is resized by timm's interpolation over an offset grid computed in "
        "Python from the partition size, which torch.export specializes to the example input's size",
        example="maxvit_nano_rw_256",
        tiny=TinyModel(
            dict(embed_dim=(16, 32, 48, 64), depths=(1, 1, 1, 1), stem_width=(16, 16), transformer_dim_head=16),
            step=32,  # windows of img_size / 32: 2x2 at 64 px
            conformance=gray_and_4ch((64, 96), 160),
            multiple=32,
            script_fx="",
            script_fx_note="its own module checks TorchScript, FX and export: tests/test_family_maxxvit_gcvit.py",
        ),
    ),
)
