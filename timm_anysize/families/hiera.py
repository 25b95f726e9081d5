"""Hiera at any input size: the token unrolling done for each size, the position embedding resampled (cached).

timm's Hiera fixes its input size at construction: ``Unroll`` reorders tokens for one grid so that mask units
(8x8 tokens) and the pooling strides are contiguous in memory, and ``Reroll`` undoes it for intermediates.
Everything else reads sizes off the token count, so an unroll (and reroll) for the input's grid is all another size
needs; inputs are padded (bottom/right) to whole mask units. The unroll/reroll here are timm's steps for 2-D
images as functions of the grid (TorchScript compiles them; FX records each as one node). At the model's own size
the eager path is timm's own, bit for bit.
"""

from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from timm.models import hiera

from timm_anysize.core.cache import symbolic, traced
from timm_anysize.core.family import OVERLAPPING_STEM, DynamicPath, Family, TinyModel, gray_and_4ch, no_patch_change
from timm_anysize.core.intermediates import Intermediates
from timm_anysize.core.padding import check_multiple, pad_to_multiple
from timm_anysize.core.runtime_options import RuntimeOptions, RuntimeOptionsMixin

__all__ = ["FAMILIES", "DynamicHiera", "enable_hiera_dynamic", "unroll_tokens", "reroll_tokens"]


@torch.fx.wrap
@register_notrace_function
def unroll_tokens(x: torch.Tensor, size: List[int], schedule: List[List[int]]) -> torch.Tensor:
    """timm's ``hiera.Unroll`` for a 2-D token grid ``size``: ``[B, H*W, C]`` reordered so that each pooling
    stride of ``schedule`` is contiguous.

    Example:
        >>> x = torch.randn(2, 8 * 6, 4)
        >>> torch.equal(unroll_tokens(x, [8, 6], [[2, 2]]), hiera.Unroll((8, 6), (1, 1), [(2, 2)])(x))
        True
    """
    B, C = x.shape[0], x.shape[-1]
    cur = [size[0], size[1]]
    x = x.view(B, cur[0], cur[1], C)
    for strides in schedule:
        cur = [cur[0] // strides[0], cur[1] // strides[1]]
        x = x.view(B, cur[0], strides[0], cur[1], strides[1], C).permute(0, 2, 4, 1, 3, 5).flatten(0, 2)
        B = B * strides[0] * strides[1]
    return x.reshape(-1, size[0] * size[1], C)


@torch.fx.wrap
@register_notrace_function
def reroll_tokens(
    x: torch.Tensor, size: List[int], schedule: List[List[int]], block_idx: int, stage_ends: List[int], q_pool: int
) -> torch.Tensor:
    """timm's ``hiera.Reroll`` (no mask) for a 2-D token grid ``size``: block ``block_idx``'s tokens as
    ``[B, H, W, C]``."""
    size = [size[0], size[1]]
    for i in range(block_idx):  # the unrolls consumed by the stage ends with pooling before this block
        if i in stage_ends[:q_pool] and len(schedule) > 0:
            size = [size[0] // schedule[0][0], size[1] // schedule[0][1]]
            schedule = schedule[1:]
    B, N, C = x.shape
    mu = [1, 1]
    for strides in schedule:
        x = x.view(B, strides[0], strides[1], N // (strides[0] * strides[1]), mu[0], mu[1], C)
        x = x.permute(0, 3, 1, 4, 2, 5, 6)
        mu = [mu[0] * strides[0], mu[1] * strides[1]]
        x = x.reshape(B, -1, mu[0], mu[1], C)
        N = x.shape[1]
    # timm's undo_windowing in 2-D: [B, #MUy*#MUx, MUy, MUx, C] -> [B, #MUy*MUy, #MUx*MUx, C]
    x = x.view(B, size[0] // mu[0], size[1] // mu[1], mu[0], mu[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, size[0], size[1], C)


class _Unroll(hiera.Unroll):
    """timm's Unroll as :func:`unroll_tokens` (which TorchScript compiles; timm's own does not script)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unroll_tokens(x, self.size, [[s[0], s[1]] for s in self.schedule])


class _Reroll(hiera.Reroll):
    """timm's Reroll as :func:`reroll_tokens` when there is no mask (timm's own, masked, does not script)."""

    def forward(self, x: torch.Tensor, block_idx: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not torch.jit.is_scripting() and mask is not None:
            return super().forward(x, block_idx, mask=mask)
        return reroll_tokens(
            x, self.size, self._anysize_schedule, block_idx, self._anysize_stage_ends, self._anysize_q_pool
        )


def enable_hiera_dynamic(model: hiera.Hiera, options: RuntimeOptions) -> None:
    """Swap in the unroll / reroll that TorchScript compiles, in place (same steps, same outputs)."""
    model.unroll.__class__ = _Unroll
    model.reroll.__class__ = _Reroll
    model.reroll._anysize_schedule = [[s[0], s[1]] for s in model.unroll.schedule]
    model.reroll._anysize_stage_ends = list(model.stage_ends)
    model.reroll._anysize_q_pool = int(model.q_pool)


class DynamicHiera(RuntimeOptionsMixin, Intermediates, hiera.Hiera):
    """timm's Hiera at any input size (set by :func:`timm_anysize.enable_dynamic`).

    Other sizes take the classification and intermediates paths: no masks (MAE-style), no separate space/time
    position embeddings (video); those raise a ``ValueError``.
    """

    intermediates_formats = ("NCHW", "NHWC")
    intermediates_format_error = "Output format must be one of NCHW, NHWC."

    def _unit(self) -> List[int]:
        """Input pixels per mask unit: what every size is padded to a multiple of."""
        return [self.patch_stride[0] * self.mask_unit_size[0], self.patch_stride[1] * self.mask_unit_size[1]]

    @torch.jit.unused
    def _timm_path(self, x: torch.Tensor, mask: Optional[torch.Tensor], other: bool) -> bool:
        """Eager at the built size: timm's own path. Elsewhere masks, patch dropout and video embeddings raise."""
        if symbolic(x):  # FX records the unmasked path (timm's forward makes ``mask`` a placeholder, never a mask)
            return False
        native = [t * s for t, s in zip(self.tokens_spatial_shape, self.patch_stride)]
        if not traced() and list(x.shape[-2:]) == native:
            return True
        patch_drop = self.training and self.patch_drop_rate > 0
        if mask is not None or other or self.pos_embed is None or patch_drop:
            raise ValueError(
                f"Hiera at {x.shape[-2]}x{x.shape[-1]} (built for {native[0]}x{native[1]}): masks, patch dropout, "
                f"return_intermediates of forward_features and separate space/time position embeddings run at the "
                f"built size only"
            )
        return False

    def _anysize_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        """Padded to whole mask units, embedded, position added, unrolled; and the token grid."""
        unit = self._unit()
        if not torch.jit.is_scripting():
            self._check_pad(x, unit)
        x = pad_to_multiple(x, unit, True)  # always: the graph takes no branch on the size
        grid = [x.shape[-2] // self.patch_stride[0], x.shape[-1] // self.patch_stride[1]]
        x = self.patch_embed(x)
        x = x + self._dynamic_pos_embed(grid)
        return unroll_tokens(x, grid, self._schedule()), grid

    def _schedule(self) -> List[List[int]]:
        return [[s[0], s[1]] for s in self.unroll.schedule]

    @torch.jit.unused
    def _check_pad(self, x: torch.Tensor, unit: List[int]) -> None:
        if symbolic(x) or traced() or self.anysize_options().pad:
            return
        check_multiple(x.shape[-2:], unit, what="Hiera's mask unit (patch stride x mask unit size)")

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if symbolic(mask):  # FX makes the argument a placeholder: record the unmasked path
                mask = None
        x = self.forward_features(x, mask=mask)
        if mask is None:
            x = self.forward_head(x)
        return x

    def forward_features(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, return_intermediates: bool = False
    ) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._timm_path(x, mask, return_intermediates):
            return super().forward_features(x, mask=mask, return_intermediates=return_intermediates)
        x, _ = self._anysize_embed(x)
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward_intermediates(  # type: ignore[override]  # timm's Hiera takes mask before indices
        self,
        x: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = True,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        coarse: bool = True,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ``forward_intermediates`` (its signature: a mask, levels per stage when ``coarse``) with the unroll,
        reroll and position embedding of the input's grid."""
        if not torch.jit.is_scripting() and self._timm_path(x, mask, False):
            return hiera.Hiera.forward_intermediates(
                self,
                x,
                mask=mask,
                indices=indices,
                norm=norm,
                stop_early=stop_early,
                output_fmt=output_fmt,
                intermediates_only=intermediates_only,
                coarse=coarse,
            )
        assert not norm, "normalization of features not supported"
        final, features = self._forward_intermediates(
            x, indices, norm, stop_early, output_fmt, intermediates_only, self.stage_ends if coarse else None
        )
        return features if intermediates_only else (final, features)

    def _intermediates_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        return self._anysize_embed(x)

    def _intermediates_feature(
        self, i: int, x: torch.Tensor, grid: List[int], norm: bool, output_fmt: str
    ) -> torch.Tensor:
        x = reroll_tokens(x, grid, self._schedule(), i, self.stage_ends, self.q_pool)
        return x.permute(0, 3, 1, 2) if output_fmt == "NCHW" else x

    def _intermediates_final(self, x: torch.Tensor, grid: List[int], last: bool) -> torch.Tensor:
        return x

    def _dynamic_pos_embed(self, grid: List[int]) -> torch.Tensor:
        if self.pos_embed_win is not None:  # absolute-window variant: timm's recipe at the grid's number of units
            units = [grid[0] // self.mask_unit_size[0], grid[1] // self.mask_unit_size[1]]
            pos_embed_win = self.pos_embed_win.tile(units)
            pos_embed = F.interpolate(self.pos_embed, size=pos_embed_win.shape[-2:], mode="bicubic", antialias=True)
            return (pos_embed + pos_embed_win).flatten(2).transpose(1, 2)
        native = self.tokens_spatial_shape
        return self.pos_tokens_at(self.pos_embed, grid, [native[0], native[1]], 0)


FAMILIES = (
    Family(
        name="hiera",
        dynamic_features=True,
        classes=(hiera.Hiera,),
        pos_embed_prefix=0,
        unsupported=no_patch_change(OVERLAPPING_STEM.format(name="Hiera")),
        export_note="torch.export and torch.compile(dynamic=True) of the mask-unit unroll over a padded, symbolic "
        "size did not finish in minutes (symbolic shape solving); export or compile it at one size",
        dynamic_args=(),  # enable_dynamic rebuilds the token unroll per size
        runtime=DynamicPath(classes={hiera.Hiera: DynamicHiera}, setup=enable_hiera_dynamic, patch_layout="none"),
        example="hiera_tiny_224",
        tiny=TinyModel(
            dict(embed_dim=32, num_heads=1, stages=(1, 1, 1, 1)),
            step=32,
            script_fx="tokens",
            compile_skip="torch.compile(dynamic=True) does not finish (see export_note); dynamic=False equals eager at "
            "the three sizes (checked once) but takes about 30 s on 2 cores",
            conformance=gray_and_4ch((64, 96), 160),
            multiple=32,
        ),
    ),
)
