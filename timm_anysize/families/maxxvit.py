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
(:func:`table_bias`: the same values, bit for bit); FX records every partition attention (and CoAtNet's
attentions) as one leaf module, whose window is read off its input, and the padding as one leaf function.
"""

import math
from functools import lru_cache
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import (
    register_notrace_function, register_notrace_module, resize_rel_pos_bias_table,
)
from timm.layers.pos_embed_rel import (  # timm exports these from no shorter path
    RelPosBias, RelPosBiasTf, RelPosMlp, gen_relative_log_coords, gen_relative_position_index,
    generate_lookup_tensor, reindex_2d_einsum_lookup,
)
from timm.models import maxxvit

from timm_anysize.core.cache import PosEmbedCache, must_run_inline
from timm_anysize.core.family import NO_CONV_PATCH, REL_TABLE, DynamicPath, Family, no_patch_change
from timm_anysize.core.resample import resize_rel_pos_table
from timm_anysize.core.spec import Size2

__all__ = [
    "FAMILIES", "DynamicMaxxVit", "enable_maxxvit_dynamic", "rel_pos_bias_at", "table_bias", "pad_to_multiple",
    "maxxvit_size_multiple",
]


def _table_bias(rel_pos: nn.Module, window: Tuple[int, int]) -> torch.Tensor:
    """A flat table's bias ``[1, heads, N, N]`` at ``window``: the table resized as a load resizes it, indexed as
    timm's ``RelPosBias.get_bias`` indexes it."""
    table = rel_pos.relative_position_bias_table
    prefix = rel_pos.prefix_tokens
    heads = table.shape[-1]
    rows = (2 * window[0] - 1) * (2 * window[1] - 1) + 3 * prefix
    table = resize_rel_pos_bias_table(table, new_window_size=window, new_bias_shape=(rows, heads),
                                      old_window_size=tuple(rel_pos.window_size))
    index = gen_relative_position_index(window, class_token=prefix > 0, device=table.device).view(-1)
    area = window[0] * window[1] + prefix
    return table[index].view(area, area, heads).permute(2, 0, 1).unsqueeze(0).contiguous()


def _tf_bias(rel_pos: nn.Module, window: Tuple[int, int]) -> torch.Tensor:
    """A TF-layout table's bias at ``window`` (``RelPosBiasTf.get_bias`` on the resized table)."""
    table = rel_pos.relative_position_bias_table
    shape = (table.shape[0], 2 * window[0] - 1, 2 * window[1] - 1)
    table = resize_rel_pos_bias_table(table, new_window_size=window, new_bias_shape=shape)
    dtype = rel_pos.height_lookup.dtype
    h = generate_lookup_tensor(window[0], device=table.device, dtype=dtype)
    w = generate_lookup_tensor(window[1], device=table.device, dtype=dtype)
    return reindex_2d_einsum_lookup(table, window[0], window[1], h, w)


@lru_cache(maxsize=64)
def _log_coords(window: Tuple[int, int], pretrained: Tuple[int, int], mode: str, device: torch.device,
                dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``RelPosMlp``'s buffers for a window (they depend on sizes only)."""
    coords = gen_relative_log_coords(window, pretrained, mode=mode, device=device, dtype=dtype)
    return coords, gen_relative_position_index(window, device=device).view(-1)


def _mlp_bias(rel_pos: nn.Module, window: Tuple[int, int]) -> torch.Tensor:
    """``RelPosMlp.get_bias`` at ``window``: the MLP over that window's log coordinates."""
    coords, index = _log_coords(tuple(window), tuple(rel_pos.pretrained_window_size), rel_pos.mode,
                                rel_pos.rel_coords_log.device, rel_pos.rel_coords_log.dtype)
    area = window[0] * window[1]
    bias = rel_pos.mlp(coords).view(-1, rel_pos.num_heads)[index].view(area, area, rel_pos.num_heads)
    bias = rel_pos.bias_act(bias.permute(2, 0, 1))
    if rel_pos.bias_gain is not None:
        bias = rel_pos.bias_gain * bias
    if rel_pos.prefix_tokens:
        bias = F.pad(bias, [rel_pos.prefix_tokens, 0, rel_pos.prefix_tokens, 0])
    return bias.unsqueeze(0).contiguous()


def rel_pos_bias_at(rel_pos: nn.Module, window: List[int]) -> torch.Tensor:
    """The additive attention bias ``[1, heads, N, N]`` one of timm's relative-position modules (``RelPosBias``,
    ``RelPosBiasTf``, ``RelPosMlp``) gives at ``window``: its own at its window, else what a model built for that
    window (with the table resized as a load resizes it) gives. Tables are cached per window in eager inference
    (a module set up by :func:`enable_maxxvit_dynamic`).

    Example:
        >>> from timm.layers.pos_embed_rel import RelPosBias
        >>> rel_pos = RelPosBias((2, 2), num_heads=3)
        >>> torch.equal(rel_pos_bias_at(rel_pos, [2, 2]), rel_pos.get_bias())
        True
        >>> rel_pos_bias_at(rel_pos, [3, 2]).shape
        torch.Size([1, 3, 6, 6])
    """
    key_window = (int(window[0]), int(window[1]))
    if key_window == tuple(rel_pos.window_size):
        return rel_pos.get_bias()
    if isinstance(rel_pos, RelPosMlp):
        return _mlp_bias(rel_pos, key_window)
    compute = _tf_bias if isinstance(rel_pos, RelPosBiasTf) else _table_bias
    table = rel_pos.relative_position_bias_table
    cache = getattr(rel_pos, "_anysize_bias_cache", None)
    if cache is None or must_run_inline(table):
        return compute(rel_pos, key_window)
    key = (key_window, table.dtype, table.device, torch.is_inference_mode_enabled())
    return cache.get_or_compute(key, table, lambda: compute(rel_pos, key_window).detach())


# TorchScript: the same values from scriptable ports of timm's functions (timm's take untyped devices / modes).

def _window_index(window: List[int], device: torch.device) -> torch.Tensor:
    """timm's ``gen_relative_position_index`` without class token, flattened."""
    coords = torch.stack(torch.meshgrid([torch.arange(window[0], device=device),
                                         torch.arange(window[1], device=device)], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel[:, :, 0] += window[0] - 1
    rel[:, :, 1] += window[1] - 1
    rel[:, :, 0] *= 2 * window[1] - 1
    return rel.sum(-1).view(-1)


def _lookup(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """timm's ``generate_lookup_tensor``: ``ret[n, m, v] = 1`` where ``v = m - n + length - 1``."""
    pos = torch.arange(length, device=device)
    return F.one_hot(pos[None, :] - pos[:, None] + length - 1, 2 * length - 1).to(dtype)


@torch.fx.wrap
@register_notrace_function
def table_bias(table: torch.Tensor, old: List[int], window: List[int], tf_layout: bool,
               lookup_dtype: torch.dtype) -> torch.Tensor:
    """The bias ``[1, heads, N, N]`` (``[heads, N, N]`` for a TF-layout table) a relative-position table laid out
    for window ``old`` gives at ``window`` (scriptable; what :func:`rel_pos_bias_at` computes with timm's own
    functions).

    Example:
        >>> table_bias(torch.randn(9, 2), [2, 2], [3, 2], False, torch.float32).shape
        torch.Size([1, 2, 6, 6])
    """
    table = resize_rel_pos_table(table, old, window, not tf_layout)
    if tf_layout:
        h = _lookup(window[0], lookup_dtype, table.device)
        w = _lookup(window[1], lookup_dtype, table.device)
        return reindex_2d_einsum_lookup(table, window[0], window[1], h, w)
    area = window[0] * window[1]
    bias = table[_window_index(window, table.device)].view(area, area, -1)
    return bias.permute(2, 0, 1).unsqueeze(0).contiguous()


def _log_coords_script(window: List[int], pretrained: List[int], mode: str, device: torch.device,
                       dtype: torch.dtype) -> torch.Tensor:
    """timm's ``gen_relative_log_coords``."""
    h = torch.arange(-(window[0] - 1), window[0], device=device).to(torch.float32)
    w = torch.arange(-(window[1] - 1), window[1], device=device).to(torch.float32)
    table = torch.stack(torch.meshgrid([h, w], indexing="ij")).permute(1, 2, 0).contiguous()
    if mode == "swin":
        if pretrained[0] > 0:
            table[:, :, 0] /= (pretrained[0] - 1)
            table[:, :, 1] /= (pretrained[1] - 1)
        else:
            table[:, :, 0] /= (window[0] - 1)
            table[:, :, 1] /= (window[1] - 1)
        table *= 8
        table = torch.sign(table) * torch.log2(1.0 + table.abs()) / 3.0  # math.log2(8), exactly
    else:
        table = torch.sign(table) * torch.log(1.0 + table.abs())
    return table.to(dtype)


class _BiasAt:
    """``bias_at(window)`` on timm's relative-position modules: timm's own bias at the module's window."""

    def bias_at(self, window: List[int]) -> torch.Tensor:
        if window[0] == self.window_size[0] and window[1] == self.window_size[1]:
            return self.get_bias()
        if torch.jit.is_scripting():
            return self._script_bias(window)
        return self._eager_bias(window)

    @torch.jit.unused
    def _eager_bias(self, window: List[int]) -> torch.Tensor:
        return rel_pos_bias_at(self, window)


class DynamicRelPosBias(_BiasAt, RelPosBias):
    def _script_bias(self, window: List[int]) -> torch.Tensor:
        old = [self.window_size[0], self.window_size[1]]
        return table_bias(self.relative_position_bias_table, old, window, False, torch.float32)


class DynamicRelPosBiasTf(_BiasAt, RelPosBiasTf):
    def _script_bias(self, window: List[int]) -> torch.Tensor:
        old = [self.window_size[0], self.window_size[1]]
        return table_bias(self.relative_position_bias_table, old, window, True, self.height_lookup.dtype)


class DynamicRelPosMlp(_BiasAt, RelPosMlp):
    def _script_bias(self, window: List[int]) -> torch.Tensor:
        pretrained = [self.pretrained_window_size[0], self.pretrained_window_size[1]]
        coords = _log_coords_script(window, pretrained, self.mode, self.rel_coords_log.device,
                                    self.rel_coords_log.dtype)
        area = window[0] * window[1]
        bias = self.mlp(coords).view(-1, self.num_heads)[_window_index(window, coords.device)]
        bias = self.bias_act(bias.view(area, area, self.num_heads).permute(2, 0, 1))
        if self.bias_gain is not None:
            bias = self.bias_gain * bias
        if self.prefix_tokens:
            bias = F.pad(bias, [self.prefix_tokens, 0, self.prefix_tokens, 0])
        return bias.unsqueeze(0).contiguous()


_REL_POS = {RelPosBias: DynamicRelPosBias, RelPosBiasTf: DynamicRelPosBiasTf, RelPosMlp: DynamicRelPosMlp}


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
            x = F.scaled_dot_product_attention(
                q.transpose(-1, -2).contiguous(), k.transpose(-1, -2).contiguous(), v.transpose(-1, -2).contiguous(),
                attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.,
            ).transpose(-1, -2).reshape(B, -1, H, W)
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
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                               dropout_p=self.attn_drop.p if self.training else 0.)
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


_PARTITIONS = {
    maxxvit.PartitionAttentionCl: DynamicPartitionAttentionCl,
    maxxvit.PartitionAttention2d: DynamicPartitionAttention2d,
    maxxvit.ParallelPartitionAttention: DynamicParallelPartitionAttention,
}
_ATTENTIONS = {maxxvit.Attention2d: DynamicAttention2d, maxxvit.AttentionCl: DynamicAttentionCl}
for _cls in (*_PARTITIONS.values(), *_ATTENTIONS.values()):
    register_notrace_module(_cls)  # FX: sizes are read off shapes inside; each is one leaf


@torch.fx.wrap
@register_notrace_function
def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """An image ``[B, C, H, W]`` zero-padded bottom/right to a multiple of ``multiple`` (no copy when it is one).

    Example:
        >>> pad_to_multiple(torch.zeros(1, 3, 64, 70), 32).shape
        torch.Size([1, 3, 64, 96])
    """
    pad_h = (multiple - x.shape[-2] % multiple) % multiple
    pad_w = (multiple - x.shape[-1] % multiple) % multiple
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


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


class DynamicMaxxVit(maxxvit.MaxxVit):
    """timm's MaxxVit at any input size (set by :func:`timm_anysize.enable_dynamic`): the input padded to whole
    partitions where needed, every partition attention at its input's partition."""

    def _anysize_input(self, x: torch.Tensor) -> torch.Tensor:
        multiple = self._anysize_multiple
        if multiple > 1:
            if not self._anysize_pad and (x.shape[-2] % multiple or x.shape[-1] % multiple):
                raise ValueError(
                    f"input {x.shape[-2]}x{x.shape[-1]} is not a multiple of {multiple}, which this MaxxViT's window "
                    f"and grid partitions need, and padding is off; resize or crop to a multiple of {multiple}, or "
                    f"turn padding on (pad: true in the variant's YAML, enable_dynamic(pad=True))"
                )
            x = pad_to_multiple(x, multiple)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self._anysize_input(x))
        x = self.stages(x)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ``forward_intermediates`` on the (padded) input, at any size."""
        return super().forward_intermediates(self._anysize_input(x), indices, norm, stop_early, output_fmt,
                                             intermediates_only)


def enable_maxxvit_dynamic(model: nn.Module, cache_size: int) -> None:
    """Swap in the attention and partition classes that take their input's window, and cache tables per window
    (what :func:`timm_anysize.enable_dynamic` runs for a MaxxViT).

    Example:
        >>> import timm, timm_anysize
        >>> m = timm_anysize.enable_dynamic(timm.create_model("test_maxvit").eval())  # built for 160 px
        >>> m(torch.randn(1, 3, 96, 64)).shape
        torch.Size([1, 1000])
    """
    for module in list(model.modules()):
        partition_cls = _PARTITIONS.get(type(module))
        if partition_cls is not None:
            module._anysize_stride = _module_stride(model, module)
            module._anysize_ratio = int(model.partition_ratio) if _derived(model, module) else 0
            module.__class__ = partition_cls
        attention_cls = _ATTENTIONS.get(type(module))
        if attention_cls is not None:
            module.__class__ = attention_cls
        rel_pos_cls = _REL_POS.get(type(module))
        if rel_pos_cls is not None:
            module.__class__ = rel_pos_cls
            module._anysize_bias_cache = PosEmbedCache(cache_size)
    model._anysize_multiple = maxxvit_size_multiple(model)
    model._anysize_pad = model._anysize_dynamic.pad


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
    ),
)
