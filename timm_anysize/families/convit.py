"""ConViT: a token position embedding over patch tokens only (the class token joins after the local GPSA blocks),
and gated positional self-attention (GPSA) whose positional scores come from the relative offsets ``(dx, dy,
dx^2 + dy^2)`` between the tokens of the patch grid.

The offsets are no weights (a non-persistent buffer), so at load time only ``pos_embed`` is resampled (bicubic with
antialias, no prefix). timm recomputes the offsets from the token count, for a square grid only
(``int(N ** 0.5)``); here the model passes the patch grid of the input to every GPSA, which builds the offsets of
that grid, square or not (the same numbers as timm's for a square grid), cached per grid. The position embedding is
resampled to the input's grid and cached. At the model's own size every step gives timm's outputs, bit for bit.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import register_notrace_function, register_notrace_module
from timm.models import convit

from timm_anysize.core.cache import PosEmbedCache, traced
from timm_anysize.core.family import DynamicPath, Family, TinyModel, gray_and_4ch
from timm_anysize.core.intermediates import Intermediates, token_features
from timm_anysize.core.runtime_options import RuntimeOptions, RuntimeOptionsMixin, swap_classes

__all__ = ["FAMILIES", "DynamicConVit", "gpsa_rel_indices"]


@torch.fx.wrap
@register_notrace_function
def gpsa_rel_indices(grid: List[int], like: torch.Tensor) -> torch.Tensor:
    """GPSA's relative offsets between the tokens of an ``H x W`` grid (row-major), ``[1, N, N, 3]``: ``dx``, ``dy``
    and ``dx^2 + dy^2`` (timm's ``get_rel_indices`` for a square grid), on ``like``'s device and dtype.

    Example:
        >>> gpsa_rel_indices([2, 3], torch.zeros(1))[0, 0, 5].tolist()  # token (0, 0) -> token (1, 2)
        [2.0, 1.0, 5.0]
    """
    h, w = grid[0], grid[1]
    token = torch.arange(h * w)  # row and column by division: repeat_interleave exports to an ONNX Expand that fails
    row = torch.div(token, w, rounding_mode="floor")
    ys, xs = row.to(torch.float32), (token - row * w).to(torch.float32)
    indx = xs[None, :] - xs[:, None]
    indy = ys[None, :] - ys[:, None]
    rel = torch.stack([indx, indy, indx**2 + indy**2], dim=-1)[None]
    return rel.to(device=like.device, dtype=like.dtype)


@register_notrace_module  # as timm's GPSA: a leaf for FX (the grid reaches it as an argument)
class DynamicGPSA(convit.GPSA):
    """timm's GPSA with the offsets of the grid it is given (timm's square grid from the token count when none)."""

    def forward(self, x: torch.Tensor, grid: Optional[List[int]] = None) -> torch.Tensor:
        B, N, C = x.shape
        if grid is None:
            side = int(N**0.5)
            grid = [side, side]
        if torch.jit.is_scripting():
            rel_indices = gpsa_rel_indices(grid, self.qk.weight)
        else:
            rel_indices = self._anysize_rel_indices(grid)
        qk = self.qk(x).reshape(B, N, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = qk[0], qk[1]
        pos_score = self.pos_proj(rel_indices.expand(B, -1, -1, -1)).permute(0, 3, 1, 2)
        patch_score = (q @ k.transpose(-2, -1)) * self.scale
        patch_score = patch_score.softmax(dim=-1)
        pos_score = pos_score.softmax(dim=-1)
        gating = self.gating_param.view(1, -1, 1, 1)
        attn = (1.0 - torch.sigmoid(gating)) * patch_score + torch.sigmoid(gating) * pos_score
        attn = attn / attn.sum(dim=-1).unsqueeze(-1)
        attn = self.attn_drop(attn)
        v = self.v(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return self.proj_drop(x)

    @torch.jit.unused
    def _anysize_rel_indices(self, grid: List[int]) -> torch.Tensor:
        like = self.qk.weight
        if traced():
            return gpsa_rel_indices(grid, like)
        key = (int(grid[0]), int(grid[1]), like.dtype, like.device)
        # offsets derive from the grid alone: the stamp is a constant tensor, never the (trained) weights
        return self._anysize_rel_cache.get_or_compute(key, self._anysize_stamp, lambda: gpsa_rel_indices(grid, like))


class DynamicMHSA(convit.MHSA):
    """timm's MHSA, taking (and ignoring) a grid like GPSA (so a block calls either the same way)."""

    def forward(self, x: torch.Tensor, grid: Optional[List[int]] = None) -> torch.Tensor:
        # timm's MHSA.forward, spelled out: TorchScript has no super()
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return self.proj_drop(x)


class DynamicBlock(convit.Block):
    """timm's ConViT block, passing the patch grid to its attention."""

    def forward(self, x: torch.Tensor, grid: Optional[List[int]] = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DynamicConVit(RuntimeOptionsMixin, Intermediates, convit.ConVit):
    """timm's ConViT at any input size: position embedding and GPSA offsets for the input's patch grid."""

    def _anysize_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        """Patch tokens plus the position embedding of the input's grid, and that grid."""
        x = self.patch_embed(x)  # NHWC (enable_dynamic): the grid is read off it, whatever the patch of the call
        B, H, W, C = x.shape
        grid = [H, W]
        x = x.reshape(B, H * W, C)
        if self.use_pos_embed:
            native = self.patch_embed.grid_size
            x = x + self.pos_tokens_at(self.pos_embed, grid, [native[0], native[1]], 0)
        return self.pos_drop(x), grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self._anysize_embed(x)
        for u, blk in enumerate(self.blocks):
            if u == self.local_up_to_layer and self.cls_token is not None:
                x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            x = blk(x, grid)
        return self.norm(x)

    def _intermediates_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        return self._anysize_embed(x)

    def _intermediates_block(
        self, i: int, blk: nn.Module, x: torch.Tensor, grid: List[int]
    ) -> Tuple[torch.Tensor, List[int]]:
        if i == self.local_up_to_layer and self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return blk(x, grid), grid

    def _intermediates_feature(
        self, i: int, x: torch.Tensor, grid: List[int], norm: bool, output_fmt: str
    ) -> torch.Tensor:
        prefix = 1 if i >= self.local_up_to_layer else 0  # the class token, from the first non-local block on
        return token_features(self.norm(x) if norm else x, grid, prefix, output_fmt)[0]


_MODULES = {convit.GPSA: DynamicGPSA, convit.MHSA: DynamicMHSA, convit.Block: DynamicBlock}


def enable_convit_dynamic(model: convit.ConVit, options: RuntimeOptions) -> None:
    """Swap in the blocks and attentions that take the patch grid."""
    for module in swap_classes(model, _MODULES):
        if isinstance(module, DynamicGPSA):
            module._anysize_rel_cache = PosEmbedCache(options.cache_size)
            module._anysize_stamp = torch.zeros(0)


FAMILIES = (
    Family(
        name="convit",
        dynamic_features=True,
        classes=(convit.ConVit,),
        pos_embed_prefix=0,  # patch tokens only: the class token joins after the GPSA blocks
        static_unsupported={
            "img_non_square": "timm's ConViT computes its GPSA relative positions for a square "
            "patch grid (its forward fails on another); the dynamic path computes "
            "them per grid"
        },
        dynamic_args=(),  # timm's ConViT has no dynamic-size path; enable_dynamic adds it
        runtime=DynamicPath(classes={convit.ConVit: DynamicConVit}, setup=enable_convit_dynamic, patch_layout="nhwc"),
        attention_maps=8,  # GPSA: patch scores, position scores, both softmaxes, their gated sum (measured 6.7)
        example="convit_tiny",
        tiny=TinyModel(
            dict(embed_dim=32, depth=2, num_heads=2, local_up_to_layer=1),  # embed_dim per head
            script_fx="fsam",
            conformance=gray_and_4ch(
                (96, 160), 144, patch_size=12, model_args=dict(embed_dim=32, depth=3, num_heads=2, local_up_to_layer=2)
            ),
            multiple=16,
        ),
    ),
)
