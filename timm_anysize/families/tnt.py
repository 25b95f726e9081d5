"""TNT (Transformer in Transformer): the outer (patch) position embedding ``patch_pos`` ``[1, 1 + H*W, C]`` on the
patch grid, and the inner ``pixel_pos`` ``[1, C, h, w]`` over the pixels of one patch.

A geometry change moves the patch grid only: ``patch_pos`` is resampled (bicubic with antialias, the class entry
kept aside, as timm's ``checkpoint_filter_fn`` resamples it) and ``pixel_pos`` is copied. The patch size cannot
change: it sets the pixels per patch, and with them the width of every block's ``proj`` (pixels x inner dim ->
outer dim), a learned matrix with no principled resize.

timm's ``PixelEmbed`` asserts the size it was built for and ``forward_features`` reshapes to its token count. Here the
model embeds whole patches of any input (padded bottom/right to whole patches where ``pad``), with ``patch_pos``
resampled to the input's grid and cached; the blocks are timm's own (they read the token count off their input). At
the model's own size every step is timm's, bit for bit.
"""

from typing import List, Tuple

import torch
import torch.nn as nn
from timm.models import checkpoint, tnt

from timm_anysize.core.cache import patch_grid, traced
from timm_anysize.core.family import DynamicPath, Family, TinyModel, gray_and_4ch, no_patch_change
from timm_anysize.core.intermediates import PrefixTokenIntermediates, token_features
from timm_anysize.core.padding import check_multiple, pad_to_multiple
from timm_anysize.core.runtime_options import RuntimeOptionsMixin
from timm_anysize.core.spec import Size2

torch.fx.wrap("pad_to_multiple")  # a leaf of plain FX traces here too (fx.wrap patches this module's globals)

__all__ = ["FAMILIES", "DynamicTNT"]


class DynamicTNT(RuntimeOptionsMixin, PrefixTokenIntermediates, tnt.TNT):
    """timm's TNT at any input size: whole patches of the input, ``patch_pos`` resampled to its grid (cached)."""

    def _anysize_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
        """Pixel and patch embeddings of the input (timm's steps, at the input's grid), and that grid."""
        pe = self.pixel_embed
        ps = [pe.patch_size[0], pe.patch_size[1]]
        if self.anysize_options().pad:  # scripting, compiling, exporting: always pad (no branch on the size)
            x = pad_to_multiple(x, ps, torch.jit.is_scripting() or self._anysize_traced())
        elif not torch.jit.is_scripting():
            self._anysize_check_divisible(x, ps)
        grid = patch_grid(x, ps, False)
        B, C = x.shape[0], x.shape[1]
        N = grid[0] * grid[1]
        if pe.legacy:
            x = pe.unfold(pe.proj(x))
            x = x.transpose(1, 2).reshape(B * N, pe.in_dim, pe.new_patch_size[0], pe.new_patch_size[1])
        else:
            x = pe.unfold(x)
            x = pe.proj(x.transpose(1, 2).reshape(B * N, C, ps[0], ps[1]))
        x = x + self.pixel_pos
        pixel_embed = x.reshape(B * N, pe.in_dim, -1).transpose(1, 2)

        patch_embed = self.norm2_proj(self.proj(self.norm1_proj(pixel_embed.reshape(B, N, -1))))
        patch_embed = torch.cat((self.cls_token.expand(B, -1, -1), patch_embed), dim=1)
        native = pe.grid_size
        pos = self.pos_tokens_at(self.patch_pos, grid, [native[0], native[1]], 1, "patch_pos")
        return pixel_embed, self.pos_drop(patch_embed + pos), grid

    @torch.jit.unused
    def _anysize_traced(self) -> bool:
        return traced()

    @torch.jit.unused
    def _anysize_check_divisible(self, x: torch.Tensor, ps: List[int]) -> None:
        if isinstance(x, torch.fx.Proxy) or traced():
            return
        check_multiple(x.shape[-2:], ps)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        pixel_embed, patch_embed, _ = self._anysize_embed(x)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                pixel_embed, patch_embed = checkpoint(blk, pixel_embed, patch_embed)
            else:
                pixel_embed, patch_embed = blk(pixel_embed, patch_embed)
        return self.norm(patch_embed)

    def _intermediates_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[torch.Tensor, List[int]]]:
        pixel_embed, patch_embed, grid = self._anysize_embed(x)
        return patch_embed, (pixel_embed, grid)  # the inner (pixel) stream travels as the context

    def _intermediates_block(
        self, i: int, blk: nn.Module, patch_embed: torch.Tensor, ctx: Tuple[torch.Tensor, List[int]]
    ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, List[int]]]:
        pixel_embed, grid = ctx
        if self.grad_checkpointing and not torch.jit.is_scripting():
            pixel_embed, patch_embed = checkpoint(blk, pixel_embed, patch_embed)
        else:
            pixel_embed, patch_embed = blk(pixel_embed, patch_embed)
        return patch_embed, (pixel_embed, grid)

    def _intermediates_feature(
        self, i: int, x: torch.Tensor, ctx: Tuple[torch.Tensor, List[int]], norm: bool, output_fmt: str
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        return token_features(self.norm(x) if norm else x, ctx[1], self.num_prefix_tokens, output_fmt)


def _whole_patches(model: tnt.TNT, img_size: Size2) -> tuple[tuple[str, Size2, Size2], ...]:
    """The image must be whole patches: timm's unfold would drop the rest (and the patch size cannot change)."""
    ps = model.pixel_embed.patch_size
    return (("the pixel embedding", (img_size[0], img_size[1]), (int(ps[0]), int(ps[1]))),)


FAMILIES = (
    Family(
        name="tnt",
        dynamic_features=True,
        classes=(tnt.TNT,),
        checkpoint_filter=tnt.checkpoint_filter_fn,  # original TNT names; resamples only at another grid
        tensors=(("patch_pos", "pos_tokens"),),  # pixel_pos spans one patch's pixels: no geometry change moves it
        patch_embeds=("pixel_embed",),
        unsupported=no_patch_change(
            "the patch size sets TNT's pixels per patch, and with them the width of every block's proj "
            "(pixels x inner dim -> outer dim), a learned matrix with no principled resize"
        ),
        dynamic_args=(),  # timm's TNT has no dynamic-size path; enable_dynamic adds it
        runtime=DynamicPath(classes={tnt.TNT: DynamicTNT}, patch_layout="none"),
        size_multiples=_whole_patches,
        example="tnt_s_patch16_224",
        tiny=TinyModel(
            dict(embed_dim=64, depth=2, inner_dim=16, num_heads_inner=2, num_heads_outer=2),
            script_fx="fsam",
            timm_runs_off_multiple="timm's unfold drops the pixels past the last whole patch "
            "(tests/test_family_tnt.py)",
            conformance=gray_and_4ch(
                (96, 160),
                144,
                model_args=dict(embed_dim=64, depth=3, inner_dim=16, num_heads_inner=2, num_heads_outer=2),
            ),
            multiple=16,
        ),
    ),
)
