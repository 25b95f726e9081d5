"""NesT at any size: one position embedding per level, laid out in blocks, resampled as timm's ``resize_pos_embed``.

timm's NesT cuts each level's feature map into a fixed number of square blocks (``4 ** (levels - 1 - i)`` at level
``i``: the block size, not the number of blocks, follows the image) and adds a position embedding ``[1, T, N, C]``
kept in that blocked layout. A load at another size puts the blocks together into the level's grid, resamples it
and cuts it into the same number of blocks again (``pos_blocks``): timm's own ``nest.resize_pos_embed`` exactly
with ``adapt.pos_embed.antialias: false`` (timm's has no antialias; the default antialiases, as for every family).
At run time each level reads its grid off its input, resamples its embedding to it (cached per grid while the
weights are unchanged) and cuts blocks of that grid's size; non-square inputs get non-square blocks. The patch grid
must split into whole blocks at every level (a multiple of ``patch * 2 ** (levels - 1)`` pixels); the input is
padded bottom/right to one where padding is on. At the model's own size every path is timm's. ``features_only``
wrappers (timm flattens the levels into them) get the same levels.

timm builds NesT for square sizes only (its constructor asserts it), so a non-square variant is declared.
"""

from typing import List

import torch
import torch.nn as nn
from timm.layers import register_notrace_function
from timm.models import FeatureListNet, nest

from timm_anysize.core.cache import cached_or_inline, symbolic, traced
from timm_anysize.core.family import DynamicPath, Family, TinyModel, gray_and_4ch
from timm_anysize.core.padding import check_multiple, pad_to_multiple
from timm_anysize.core.resample import resample_blocks
from timm_anysize.core.runtime_options import (
    RuntimeOptions,
    RuntimeOptionsMixin,
    cache_for,
    set_runtime_options,
)

__all__ = ["FAMILIES", "DynamicNestLevel", "DynamicNestPatchEmbed", "enable_nest_dynamic", "nest_pos_embed"]

_SQUARE = "timm builds NesT for square sizes only (its constructor asserts img_size[0] == img_size[1])"


@torch.fx.wrap
@register_notrace_function
def nest_pos_embed(
    pos_embed: torch.Tensor, grid: List[int], interpolation: str, antialias: bool, always_resample: bool
) -> torch.Tensor:
    """A level's blocked position embedding for a ``grid`` feature map (the same blocks, each ``grid / g``): the
    embedding itself on its own grid, unless ``always_resample`` (compiling, exporting: no branch on the size).

    Example:
        >>> nest_pos_embed(torch.randn(1, 4, 16, 8), [8, 12], "bicubic", True, False).shape
        torch.Size([1, 4, 24, 8])
    """
    side = int(round((pos_embed.shape[1] * pos_embed.shape[2]) ** 0.5))
    if not always_resample and grid[0] == side and grid[1] == side:
        return pos_embed
    return resample_blocks(pos_embed, grid, interpolation, antialias)


@register_notrace_function
def blockify_hw(x: torch.Tensor, blocks: int) -> torch.Tensor:
    """timm's ``nest.blockify`` for a ``blocks x blocks`` split of a (possibly non-square) ``[B, H, W, C]`` map."""
    B, H, W, C = x.shape
    bh, bw = H // blocks, W // blocks
    x = x.reshape(B, blocks, bh, blocks, bw, C)
    return x.transpose(2, 3).reshape(B, blocks * blocks, bh * bw, C)


@register_notrace_function
def deblockify_hw(x: torch.Tensor, blocks: int, height: int, width: int) -> torch.Tensor:
    """timm's ``nest.deblockify`` back to a ``height x width`` map."""
    B, T, N, C = x.shape
    bh, bw = height // blocks, width // blocks
    x = x.reshape(B, blocks, blocks, bh, bw, C)
    return x.transpose(2, 3).reshape(B, height, width, C)


class DynamicNestLevel(RuntimeOptionsMixin, nest.NestLevel):
    """timm's NesT level at the grid of its input: its blocks (as many as timm's) sized by it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        x = x.permute(0, 2, 3, 1)  # (B, H', W', C)
        H, W = x.shape[1], x.shape[2]
        x = blockify_hw(x, self._anysize_blocks)
        x = x + self._anysize_pos(x, [H, W])
        x = self.transformer_encoder(x)
        x = deblockify_hw(x, self._anysize_blocks, H, W)
        return x.permute(0, 3, 1, 2)

    def _anysize_pos(self, x: torch.Tensor, grid: List[int]) -> torch.Tensor:
        if torch.jit.is_scripting():
            options = self.anysize_options()
            return nest_pos_embed(self.pos_embed, grid, options.interpolation, options.antialias, False)
        return self._eager_pos(x, grid)

    @torch.jit.unused
    def _eager_pos(self, x: torch.Tensor, grid: List[int]) -> torch.Tensor:
        pos = self.pos_embed
        interpolation, antialias = self.anysize_options().interpolation, self.anysize_options().antialias
        if isinstance(grid[0], torch.fx.Proxy) or traced():  # FX: one node; compiling, exporting: no size branch
            return nest_pos_embed(pos, grid, interpolation, antialias, traced())
        key_grid = (int(grid[0]), int(grid[1]))

        def compute() -> torch.Tensor:
            return nest_pos_embed(pos, list(key_grid), interpolation, antialias, False)

        if key_grid == (self._anysize_side,) * 2:  # its own grid: the embedding itself, nothing to cache
            return compute()
        return cached_or_inline(cache_for(self, "pos_embed"), (key_grid,), pos, compute)


class DynamicNestPatchEmbed(RuntimeOptionsMixin, nest.PatchEmbed):
    """timm's patch embedding (``flatten=False``) at any size, padding bottom/right to whole blocks where asked
    (while scripting, tracing, compiling or exporting: always, so the graph has no shape branch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.anysize_options().pad:
            if torch.jit.is_scripting() or self._must_pad(x):
                x = pad_to_multiple(x, [self._anysize_multiple, self._anysize_multiple], True)
        elif not torch.jit.is_scripting():
            self._check_whole_blocks(x)
        return self.norm(self.proj(x))

    @torch.jit.unused
    def _must_pad(self, x: torch.Tensor) -> bool:
        if symbolic(x) or traced():
            return True
        return bool(x.shape[-2] % self._anysize_multiple or x.shape[-1] % self._anysize_multiple)

    @torch.jit.unused
    def _check_whole_blocks(self, x: torch.Tensor) -> None:
        if not symbolic(x):
            m = self._anysize_multiple
            check_multiple(x.shape[-2:], (m, m), what="NesT's whole blocks at every level (patch x 2 ** (levels - 1))")


def _make_dynamic(model: nn.Module, options: RuntimeOptions) -> None:
    """The levels (resampling and a cache each) and the patch embedding (padding) with ``options``."""
    levels = [m for m in model.children() if isinstance(m, nest.NestLevel)] or list(model.levels)
    for level in levels:
        level.__class__ = DynamicNestLevel
        t, n = level.pos_embed.shape[1:3]
        level._anysize_blocks = int(round(t**0.5))
        level._anysize_side = int(round((t * n) ** 0.5))
        set_runtime_options(level, options)
    pe = model.patch_embed
    pe.__class__ = DynamicNestPatchEmbed
    pe.strict_img_size = False
    pe._anysize_multiple = pe.patch_size[0] * levels[0]._anysize_blocks  # whole blocks at the first level
    set_runtime_options(pe, options)


def enable_nest_dynamic(model: nn.Module, options: RuntimeOptions) -> None:
    """Swap in the levels that read their grid off their input, and a patch embedding that takes any size."""
    _make_dynamic(model, options)


def _enable_features(model: nn.Module, pad: bool) -> None:
    """A ``features_only`` wrapper (timm flattens the levels into it): the same levels, resampling bicubic with
    antialias (the defaults: timm-anysize's enabler interface passes no interpolation), the default cache size."""
    _make_dynamic(model, RuntimeOptions(pad=pad))
    model.dynamic_img_size = True


def _claims(model: nn.Module) -> bool:
    """A ``features_only`` wrapper of a NesT (the full model keeps its class and swaps its levels)."""
    return type(model) is FeatureListNet and any(isinstance(m, nest.NestLevel) for m in model.children())


FAMILIES = (
    Family(
        name="nest",
        classes=(nest.Nest,),
        tensors=(("levels.*.pos_embed", "pos_blocks"),),
        unsupported={"img_non_square": _SQUARE},
        onnx_note="ONNX stops on timm's own attention (plain timm's NesT too): a 5-D scaled_dot_product_attention "
        "over blocks x tokens, which onnxscript converts in 4-D only",
        dynamic_args=(),  # enable_dynamic swaps in levels that read their grid off their input
        dynamic_features=True,
        runtime=DynamicPath(
            classes={nest.Nest: nest.Nest},
            setup=enable_nest_dynamic,
            patch_layout="none",
            enable=_enable_features,
            claims=_claims,
        ),
        example="nest_tiny",
        tiny=TinyModel(
            conformance=gray_and_4ch(64, 128),
            multiple=16,
            script_fx="",
            script_fx_note="its own module checks TorchScript, FX and export: tests/test_efficientformer_nest.py",
            base="anysize_tiny_nest",
        ),  # NesT-T (fixed widths): 4x4 blocks of 4x4 patches
    ),
)
