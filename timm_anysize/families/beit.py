"""BEiT at any input size: relative-position bias tables resized per patch grid, cached like the position embedding.

timm's BEiT builds one bias table per attention for one window (the patch grid) and has no dynamic-size path;
``set_input_size`` resizes the tables in place for one new size. Here each grid gets the tables
``set_input_size`` would give (same functions, same order of operations: the outputs are bit-identical to a copy
of the model moved to that size), computed once per grid and reused while the weights are unchanged. The grid of
the current forward reaches the attention modules through a context variable, so threads running different
sizes at once do not interfere.
"""


import contextvars
from functools import lru_cache
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import resize_rel_pos_bias_table
from timm.models import beit

from ..cache import PosEmbedCache, dynamic_pos_embed, must_run_inline
from ..spec import Size2
from ..family import REL_TABLE, DynamicPath, Family

__all__ = ["FAMILIES", "DynamicBeit", "enable_beit_dynamic"]

_GRID: contextvars.ContextVar[Optional[Size2]] = contextvars.ContextVar("anysize_beit_grid", default=None)


@lru_cache(maxsize=32)
def _position_index(grid: Size2, device: torch.device) -> torch.Tensor:
    return beit.gen_relative_position_index(grid, device=device)


def _bias_for_grid(module: nn.Module, grid: Size2) -> torch.Tensor:
    """``[heads, N+1, N+1]``: the module's table resized to ``grid`` (as ``set_window_size``) and gathered."""
    table = module.relative_position_bias_table
    num_heads = table.shape[-1]

    def compute() -> torch.Tensor:
        resized = resize_rel_pos_bias_table(
            table,
            new_window_size=grid,
            new_bias_shape=((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3, num_heads),
            old_window_size=tuple(module.window_size),
        )
        area = grid[0] * grid[1]
        index = _position_index(grid, table.device)
        return resized[index.view(-1)].view(area + 1, area + 1, -1).permute(2, 0, 1).contiguous()

    if must_run_inline(table):
        return compute()
    key = (grid, table.dtype, table.device, torch.is_inference_mode_enabled())
    return module._anysize_bias_cache.get_or_compute(key, table, lambda: compute().detach())


class DynamicBeitAttention(beit.Attention):
    """timm's BEiT attention taking its bias for the grid of the current forward."""

    def _get_rel_pos_bias(self) -> torch.Tensor:
        grid = _GRID.get()
        if grid is None or grid == tuple(self.window_size):
            return super()._get_rel_pos_bias()
        return _bias_for_grid(self, grid).unsqueeze(0)


class DynamicRelativePositionBias(beit.RelativePositionBias):
    """timm's shared BEiT bias for the grid of the current forward."""

    def forward(self) -> torch.Tensor:
        grid = _GRID.get()
        if grid is None or grid == tuple(self.window_size):
            return super().forward()
        return _bias_for_grid(self, grid)


class DynamicBeit(beit.Beit):
    """timm's BEiT at any input size (set by :func:`timm_anysize.enable_dynamic`).

    Gradient checkpointing is not used on this path: a recomputation in the backward pass would run outside the
    forward's grid.
    """

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        grid = tuple(self.patch_embed.dynamic_feat_size(x.shape[-2:]))
        token = _GRID.set(grid)
        try:
            x = self.patch_embed(x)  # tokens, as timm lays them out
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            if self.pos_embed is not None:
                x = x + dynamic_pos_embed(self, grid)
            x = self.pos_drop(x)
            rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
            for blk in self.blocks:
                x = blk(x, shared_rel_pos_bias=rel_pos_bias)
            return self.norm(x)
        finally:
            _GRID.reset(token)

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        """timm's ``forward_intermediates`` with the bias tables of the input's grid (any size without an absolute
        position embedding; with one, at the model's own size)."""
        grid = tuple(self.patch_embed.dynamic_feat_size(x.shape[-2:]))
        if self.pos_embed is not None and grid != tuple(self.patch_embed.grid_size):
            raise ValueError(
                f"DynamicBeit.forward_intermediates: this BEiT has an absolute position embedding, which timm's "
                f"intermediates path adds at the built grid {tuple(self.patch_embed.grid_size)} only; got grid {grid} "
                f"(forward and forward_features run at any size)"
            )
        token = _GRID.set(grid)
        try:
            return super().forward_intermediates(x, *args, **kwargs)
        finally:
            _GRID.reset(token)


def enable_beit_dynamic(model: beit.Beit, cache_size: int) -> None:
    """Swap in the dynamic classes, in place (the patch embedding is set up by the caller)."""
    model.__class__ = DynamicBeit
    for module in model.modules():
        if type(module) is beit.Attention and module.relative_position_bias_table is not None:
            module.__class__ = DynamicBeitAttention
            module._anysize_bias_cache = PosEmbedCache(cache_size)
        elif type(module) is beit.RelativePositionBias:
            module.__class__ = DynamicRelativePositionBias
            module._anysize_bias_cache = PosEmbedCache(cache_size)


FAMILIES = (
    Family(
        name="beit",
        dynamic_features=True,
        classes=(beit.Beit,),
        checkpoint_filter=beit.checkpoint_filter_fn,
        tensors=REL_TABLE,
        dynamic_args=(),  # timm's BEiT has no dynamic-size arguments; enable_dynamic adds the path
        runtime=DynamicPath(classes={beit.Beit: DynamicBeit}, setup=enable_beit_dynamic, patch_layout="tokens"),
        example="beit_base_patch16_224",
    ),
)
