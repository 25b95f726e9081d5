"""Run-time code that more than one family uses; a family module imports no other family module, only this one.

- :func:`add_pos_embed`: timm's token layout of prefix tokens and position embedding (ViT, distilled DeiT, EVA).
- :class:`AttentionBiases`: LeViT-style attention biases over ``|dy|, |dx|`` offsets at the resolution of the call
  (LeViT, EfficientFormer, EfficientFormer-V2).
- :class:`DynamicRelPosBias`, :class:`DynamicRelPosBiasTf`, :class:`DynamicRelPosMlp`: timm's relative-position
  modules (``timm.layers.pos_embed_rel``) with the bias of any window, :func:`rel_pos_bias_at` in eager mode and
  :func:`table_bias` (scriptable ports of timm's resize, index and lookup: the same values, bit for bit) under
  TorchScript (MaxxViT, GCViT).
"""

from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function
from timm.layers.pos_embed_rel import (  # timm exports these from no shorter path
    RelPosBias,
    RelPosBiasTf,
    RelPosMlp,
    gen_relative_log_coords,
    gen_relative_position_index,
    generate_lookup_tensor,
    reindex_2d_einsum_lookup,
)

from timm_anysize.core.cache import cached_or_inline
from timm_anysize.core.resample import resize_bias_grid, resize_rel_pos_table
from timm_anysize.core.runtime_options import RuntimeOptionsMixin, cache_for
from timm_anysize.core.size_cache import size_lru_cache, traced

__all__ = [
    "add_pos_embed",
    "AttentionBiases",
    "levit_attention_biases",
    "BiasAt",
    "DynamicRelPosBias",
    "DynamicRelPosBiasTf",
    "DynamicRelPosMlp",
    "rel_pos_bias_at",
    "table_bias",
]


def add_pos_embed(
    x: torch.Tensor, pos_embed: torch.Tensor, prefix: List[torch.Tensor], no_embed_class: bool
) -> torch.Tensor:
    """timm's token layout: add then concat prefix tokens (no_embed_class), or concat then add."""
    if no_embed_class:
        x = x + pos_embed
        return torch.cat(prefix + [x], dim=1) if len(prefix) > 0 else x
    if len(prefix) > 0:
        x = torch.cat(prefix + [x], dim=1)
    return x + pos_embed


# LeViT-style attention biases (LeViT, EfficientFormer, EfficientFormer-V2).


def _bias_index(resolution: List[int], stride: int, device: torch.device) -> torch.Tensor:
    """timm's index of |dy| * W + |dx| between query positions (every ``stride``-th) and key positions."""
    k_pos = torch.stack(
        torch.meshgrid(
            torch.arange(resolution[0], device=device), torch.arange(resolution[1], device=device), indexing="ij"
        )
    )
    q_pos = torch.stack(
        torch.meshgrid(
            torch.arange(0, resolution[0], stride, device=device),
            torch.arange(0, resolution[1], stride, device=device),
            indexing="ij",
        )
    )
    rel = (q_pos.flatten(1)[..., :, None] - k_pos.flatten(1)[..., None, :]).abs()
    return rel[0] * resolution[1] + rel[1]


@torch.fx.wrap
@register_notrace_function
def levit_attention_biases(
    biases: torch.Tensor,
    native: List[int],
    resolution: List[int],
    stride: int,
    interpolation: str,
    always_resize: bool,
) -> torch.Tensor:
    """An attention's biases ``[heads, N_q, N_k]`` at ``resolution``: its ``[heads, H*W]`` table over offsets
    (laid out on the ``native`` grid) resized to the resolution, then indexed as timm indexes it. At the native
    resolution the table itself, unless ``always_resize`` (compiling, exporting: no branch on the size).

    Example:
        >>> levit_attention_biases(torch.randn(2, 4 * 4), [4, 4], [6, 3], 2, "bicubic", False).shape
        torch.Size([2, 6, 18])
    """
    if always_resize or resolution[0] != native[0] or resolution[1] != native[1]:
        biases = resize_bias_grid(biases, native, resolution, interpolation)
    return biases[:, _bias_index(resolution, stride, biases.device)]


class AttentionBiases(RuntimeOptionsMixin):
    """The biases of an attention at a resolution: timm's own at the module's, else resized (cached in eager mode)
    with the interpolation of its run-time options (its family's setup gives it the model's)."""

    def _anysize_biases(self, x: torch.Tensor, res: List[int], stride: int) -> torch.Tensor:
        if torch.jit.is_scripting():
            if res[0] == self.resolution[0] and res[1] == self.resolution[1]:
                return self.get_attention_biases(x.device)
            return levit_attention_biases(
                self.attention_biases,
                [self.resolution[0], self.resolution[1]],
                res,
                stride,
                self.anysize_options().interpolation,
                False,
            )
        return self._eager_biases(x, res, stride)

    @torch.jit.unused
    def _eager_biases(self, x: torch.Tensor, res: List[int], stride: int) -> torch.Tensor:
        native = [self.resolution[0], self.resolution[1]]
        interpolation = self.anysize_options().interpolation
        if isinstance(res[0], torch.fx.Proxy) or traced():  # FX: one node; compiling, exporting: no size branch
            return levit_attention_biases(self.attention_biases, native, res, stride, interpolation, traced())
        key_res = (int(res[0]), int(res[1]))
        if key_res == tuple(native):
            return self.get_attention_biases(x.device)
        biases = self.attention_biases

        def compute() -> torch.Tensor:
            return levit_attention_biases(biases, native, list(key_res), stride, interpolation, False)

        return cached_or_inline(cache_for(self, "attention_biases"), (key_res,), biases, compute)


# timm's relative-position modules at any window (MaxxViT, GCViT).


def _table_bias(rel_pos: nn.Module, window: Tuple[int, int]) -> torch.Tensor:
    """A flat table's bias ``[1, heads, N, N]`` at ``window``: the table resized as a load resizes it (timm's
    ``resize_rel_pos_bias_table``, bit for bit), indexed as timm's ``RelPosBias.get_bias`` indexes it."""
    table = rel_pos.relative_position_bias_table
    prefix = rel_pos.prefix_tokens
    heads = table.shape[-1]
    extra = 3 * prefix  # the class-token rows, kept as they are
    resized = resize_rel_pos_table(table[: table.shape[0] - extra], list(rel_pos.window_size), list(window), True)
    table = torch.cat((resized, table[table.shape[0] - extra :]), dim=0) if extra else resized
    index = _cached_window_index(window, prefix > 0, table.device)
    area = window[0] * window[1] + prefix
    return table[index].view(area, area, heads).permute(2, 0, 1).unsqueeze(0).contiguous()


def _tf_bias(rel_pos: nn.Module, window: Tuple[int, int]) -> torch.Tensor:
    """A TF-layout table's bias at ``window`` (``RelPosBiasTf.get_bias`` on the resized table)."""
    table = rel_pos.relative_position_bias_table
    old = [(table.shape[1] + 1) // 2, (table.shape[2] + 1) // 2]
    table = resize_rel_pos_table(table, old, list(window), False)
    dtype = rel_pos.height_lookup.dtype
    h = _cached_lookup(window[0], table.device, dtype)
    w = _cached_lookup(window[1], table.device, dtype)
    return reindex_2d_einsum_lookup(table, window[0], window[1], h, w)


@size_lru_cache(maxsize=64)
def _cached_window_index(window: Tuple[int, int], class_token: bool, device: torch.device) -> torch.Tensor:
    """timm's ``gen_relative_position_index`` of a window, flattened (it depends on the window only)."""
    return gen_relative_position_index(window, class_token=class_token, device=device).view(-1)


@size_lru_cache(maxsize=64)
def _cached_lookup(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """timm's ``generate_lookup_tensor`` (it depends on the length only)."""
    return generate_lookup_tensor(length, device=device, dtype=dtype)


@size_lru_cache(maxsize=64)
def _log_coords(
    window: Tuple[int, int], pretrained: Tuple[int, int], mode: str, device: torch.device, dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``RelPosMlp``'s buffers for a window (they depend on sizes only)."""
    coords = gen_relative_log_coords(window, pretrained, mode=mode, device=device, dtype=dtype)
    return coords, gen_relative_position_index(window, device=device).view(-1)


def _mlp_bias(rel_pos: nn.Module, window: Tuple[int, int]) -> torch.Tensor:
    """``RelPosMlp.get_bias`` at ``window``: the MLP over that window's log coordinates."""
    coords, index = _log_coords(
        tuple(window),
        tuple(rel_pos.pretrained_window_size),
        rel_pos.mode,
        rel_pos.rel_coords_log.device,
        rel_pos.rel_coords_log.dtype,
    )
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
    (a module its family's setup gave run-time options, :func:`~timm_anysize.core.runtime_options.cache_for`:
    MaxxViT, GCViT).

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
    cache = cache_for(rel_pos, "relative_position_bias_table")
    return cached_or_inline(cache, (key_window,), table, lambda: compute(rel_pos, key_window))


# TorchScript: the same values from scriptable ports of timm's functions (timm's take untyped devices / modes).


def _window_index(window: List[int], device: torch.device) -> torch.Tensor:
    """timm's ``gen_relative_position_index`` without class token, flattened."""
    coords = torch.stack(
        torch.meshgrid([torch.arange(window[0], device=device), torch.arange(window[1], device=device)], indexing="ij")
    ).flatten(1)
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
def table_bias(
    table: torch.Tensor, old: List[int], window: List[int], tf_layout: bool, lookup_dtype: torch.dtype
) -> torch.Tensor:
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


def _log_coords_script(
    window: List[int], pretrained: List[int], mode: str, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """timm's ``gen_relative_log_coords``."""
    h = torch.arange(-(window[0] - 1), window[0], device=device).to(torch.float32)
    w = torch.arange(-(window[1] - 1), window[1], device=device).to(torch.float32)
    table = torch.stack(torch.meshgrid([h, w], indexing="ij")).permute(1, 2, 0).contiguous()
    if mode == "swin":
        if pretrained[0] > 0:
            table[:, :, 0] /= pretrained[0] - 1
            table[:, :, 1] /= pretrained[1] - 1
        else:
            table[:, :, 0] /= window[0] - 1
            table[:, :, 1] /= window[1] - 1
        table *= 8
        table = torch.sign(table) * torch.log2(1.0 + table.abs()) / 3.0  # math.log2(8), exactly
    else:
        table = torch.sign(table) * torch.log(1.0 + table.abs())
    return table.to(dtype)


class BiasAt:
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


class DynamicRelPosBias(BiasAt, RelPosBias):
    def _script_bias(self, window: List[int]) -> torch.Tensor:
        old = [self.window_size[0], self.window_size[1]]
        return table_bias(self.relative_position_bias_table, old, window, False, torch.float32)


class DynamicRelPosBiasTf(BiasAt, RelPosBiasTf):
    def _script_bias(self, window: List[int]) -> torch.Tensor:
        old = [self.window_size[0], self.window_size[1]]
        return table_bias(self.relative_position_bias_table, old, window, True, self.height_lookup.dtype)


class DynamicRelPosMlp(BiasAt, RelPosMlp):
    def _script_bias(self, window: List[int]) -> torch.Tensor:
        pretrained = [self.pretrained_window_size[0], self.pretrained_window_size[1]]
        coords = _log_coords_script(
            window, pretrained, self.mode, self.rel_coords_log.device, self.rel_coords_log.dtype
        )
        area = window[0] * window[1]
        bias = self.mlp(coords).view(-1, self.num_heads)[_window_index(window, coords.device)]
        bias = self.bias_act(bias.view(area, area, self.num_heads).permute(2, 0, 1))
        if self.bias_gain is not None:
            bias = self.bias_gain * bias
        if self.prefix_tokens:
            bias = F.pad(bias, [self.prefix_tokens, 0, self.prefix_tokens, 0])
        return bias.unsqueeze(0).contiguous()
