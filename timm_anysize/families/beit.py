"""BEiT at any input size: relative-position bias tables resized per patch grid, cached like the position embedding.

timm's BEiT builds one bias table per attention for one window (the patch grid) and has no dynamic-size path;
``set_input_size`` resizes the tables in place for one new size. Here each grid gets the tables
``set_input_size`` would give (same functions, same order of operations: the outputs are bit-identical to a copy
of the model moved to that size), computed once per grid and reused while the weights are unchanged. The grid of
the current forward is passed down explicitly (model -> block -> attention), so threads running different sizes
at once do not interfere, gradient checkpointing recomputes at the right grid, and the path scripts and traces.

Under TorchScript, FX, ``torch.compile`` and ``torch.export`` the bias of a grid comes from
:func:`beit_rel_pos_bias`, a leaf function (timm's notrace registry and ``torch.fx.wrap``) with a scriptable port of
timm's ``resize_rel_pos_bias_table`` / ``gen_relative_position_index`` that gives the same values bit for bit
(pinned by a test). Eager forwards resize with the same port, every head at once from indices and weights cached per
pair of sizes, take timm's index cached per grid, and cache the bias per grid in inference.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function
from timm.layers.helpers import is_exporting
from timm.models import beit, checkpoint

from timm_anysize.core.cache import cached_or_inline, patch_grid, symbolic
from timm_anysize.core.compat import compat_rel_table, compat_resize_rel_table
from timm_anysize.core.family import REL_TABLE, DynamicPath, Family, TinyModel, gray_and_4ch
from timm_anysize.core.intermediates import PrefixTokenIntermediates, token_features
from timm_anysize.core.resample import resize_rel_pos_table
from timm_anysize.core.runtime_options import (
    RuntimeOptions,
    RuntimeOptionsMixin,
    cache_for,
    runtime_options,
    set_runtime_options,
    swap_classes,
)
from timm_anysize.core.size_cache import size_lru_cache
from timm_anysize.core.spec import Size2

__all__ = ["FAMILIES", "DynamicBeit", "enable_beit_dynamic", "beit_rel_pos_bias"]


def _rel_pos_index(grid: List[int], device: torch.device) -> torch.Tensor:
    """timm's ``beit.gen_relative_position_index`` (scriptable: no varargs grid helper)."""
    num_relative_distance = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
    area = grid[0] * grid[1]
    coords = torch.stack(
        torch.meshgrid(
            [
                torch.arange(grid[0], device=device, dtype=torch.long),
                torch.arange(grid[1], device=device, dtype=torch.long),
            ],
            indexing="ij",
        )
    )
    coords_flatten = torch.flatten(coords, 1)
    relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]
    relative_coords = relative_coords.permute(1, 2, 0).contiguous()
    relative_coords[:, :, 0] += grid[0] - 1
    relative_coords[:, :, 1] += grid[1] - 1
    relative_coords[:, :, 0] *= 2 * grid[1] - 1
    index = torch.zeros([area + 1, area + 1], device=device, dtype=relative_coords.dtype)
    index[1:, 1:] = relative_coords.sum(-1)
    index[0, 0:] = num_relative_distance - 3
    index[0:, 0] = num_relative_distance - 2
    index[0, 0] = num_relative_distance - 1
    return index


def _resize_table(table: torch.Tensor, window: List[int], grid: List[int], compat: str) -> torch.Tensor:
    """timm's ``resize_rel_pos_bias_table`` (flat table with 3 class-token entries, scipy off) from ``window`` to
    ``grid``, or the ``compat`` library's resize (transformers: bilinear)."""
    if window[0] == grid[0] and window[1] == grid[1]:
        return table
    if compat_rel_table(compat) == "bilinear":
        return compat_resize_rel_table(table, window, grid)
    return torch.cat((resize_rel_pos_table(table[:-3, :], window, grid, True), table[-3:, :]), dim=0)


@torch.fx.wrap
@register_notrace_function
def beit_rel_pos_bias(table: torch.Tensor, window: List[int], grid: List[int], compat: str = "timm") -> torch.Tensor:
    """A BEiT relative-position bias ``[heads, N+1, N+1]`` (``N = H*W``) for a patch grid: the table laid out for
    ``window`` resized to ``grid`` and gathered, as timm's ``set_window_size`` then forward give it (or with the
    table resized as the ``compat`` library does).

    Scriptable, and a leaf of FX traces (the grid may be symbolic there).

    Example:
        >>> beit_rel_pos_bias(torch.randn(7 * 7 + 3, 2), [4, 4], [5, 3]).shape
        torch.Size([2, 16, 16])
    """
    resized = _resize_table(table, window, grid, compat)
    area = grid[0] * grid[1]
    index = _rel_pos_index(grid, table.device)
    return resized[index.view(-1)].view(area + 1, area + 1, -1).permute(2, 0, 1).contiguous()


@size_lru_cache(maxsize=64)
def _cached_rel_pos_index(grid: Tuple[int, int], device: torch.device) -> torch.Tensor:
    """timm's ``beit.gen_relative_position_index`` for ``grid`` (it depends on the grid only)."""
    return beit.gen_relative_position_index(grid, device=device)


def _bias_for_grid(module: nn.Module, grid: Size2) -> torch.Tensor:
    """``[heads, N+1, N+1]``: the module's table resized to ``grid`` (timm's values, bit for bit), cached per grid in
    inference; the resize's plan and the index are cached per size, so a training step only resizes and gathers."""
    table = module.relative_position_bias_table

    def compute() -> torch.Tensor:
        resized = _resize_table(table, list(module.window_size), list(grid), _compat(module))
        area = grid[0] * grid[1]
        index = _cached_rel_pos_index((int(grid[0]), int(grid[1])), table.device)
        return resized[index.view(-1)].view(area + 1, area + 1, -1).permute(2, 0, 1).contiguous()

    return cached_or_inline(cache_for(module, "relative_position_bias_table"), (grid,), table, compute)


def _compat(module: nn.Module) -> str:
    """How the module's table is resized per grid (its run-time options' ``compat``)."""
    options = runtime_options(module)
    return "timm" if options is None else options.compat


def _eager_bias(module: nn.Module, grid: Optional[List[int]]) -> Optional[torch.Tensor]:
    """The bias ``[heads, N+1, N+1]`` for ``grid`` outside TorchScript, or None where timm's own (the module's
    window) applies."""
    window = [module.window_size[0], module.window_size[1]]
    if grid is None:
        return None
    compat = _compat(module)
    if symbolic(grid) or symbolic(grid[0]):  # FX: one leaf node, computed on every call of the graph
        return beit_rel_pos_bias(module.relative_position_bias_table, window, [grid[0], grid[1]], compat)
    if is_exporting():  # no shape branch, no cache
        return beit_rel_pos_bias(module.relative_position_bias_table, window, [grid[0], grid[1]], compat)
    if torch.compiler.is_compiling():  # the table resize is Python arithmetic on the grid: run it outside the graph
        return _cached_bias_outside_graph(module, [int(grid[0]), int(grid[1])])
    return _cached_bias(module, grid)


def _cached_bias(module: nn.Module, grid: List[int]) -> Optional[torch.Tensor]:
    grid = (int(grid[0]), int(grid[1]))
    if grid == tuple(module.window_size):
        return None
    return _bias_for_grid(module, grid)


@torch.compiler.disable
def _cached_bias_outside_graph(module: nn.Module, grid: List[int]) -> torch.Tensor:
    """``torch.compile``: the eager (cached) bias, the module's own at its window; a graph break."""
    bias = _cached_bias(module, grid)
    if bias is not None:
        return bias
    return beit_rel_pos_bias(module.relative_position_bias_table, list(module.window_size), grid, _compat(module))


class DynamicBeitAttention(RuntimeOptionsMixin, beit.Attention):
    """timm's BEiT attention with the bias of the forward's patch grid (``grid``; None: the module's window)."""

    def _bias_at(self, grid: Optional[List[int]]) -> torch.Tensor:
        if torch.jit.is_scripting():
            window = self.window_size
            if grid is None or (grid[0] == window[0] and grid[1] == window[1]):
                return self._get_rel_pos_bias()
            return beit_rel_pos_bias(
                self.relative_position_bias_table, [window[0], window[1]], grid, self.anysize_options().compat
            ).unsqueeze(0)
        bias = self._eager_bias_at(grid)
        return self._get_rel_pos_bias() if bias is None else bias.unsqueeze(0)

    @torch.jit.unused
    def _eager_bias_at(self, grid: Optional[List[int]]) -> Optional[torch.Tensor]:
        return _eager_bias(self, grid)

    def forward(
        self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None, grid: Optional[List[int]] = None
    ) -> torch.Tensor:
        """timm's ``Attention.forward`` (same operations) with the bias of ``grid``."""
        B, N, C = x.shape
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            if self.qkv_bias_separate:
                qkv = self.qkv(x)
                qkv += qkv_bias
            else:
                qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
        qkv = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused_attn:
            rel_pos_bias: Optional[torch.Tensor] = None
            if self.relative_position_bias_table is not None:
                rel_pos_bias = self._bias_at(grid)
                if shared_rel_pos_bias is not None:
                    rel_pos_bias = rel_pos_bias + shared_rel_pos_bias
            elif shared_rel_pos_bias is not None:
                rel_pos_bias = shared_rel_pos_bias
            x = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=rel_pos_bias,
                dropout_p=self.attn_drop.p if self.training else 0.0,
            )
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            if self.relative_position_bias_table is not None:
                attn = attn + self._bias_at(grid)
            if shared_rel_pos_bias is not None:
                attn = attn + shared_rel_pos_bias
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class DynamicBeitBlock(beit.Block):
    """timm's BEiT block passing the forward's patch grid to its attention."""

    def forward(
        self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None, grid: Optional[List[int]] = None
    ) -> torch.Tensor:
        if self.gamma_1 is None:
            x = x + self.drop_path1(self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias, grid=grid))
            x = x + self.drop_path2(self.mlp(self.norm2(x)))
        else:
            x = x + self.drop_path1(
                self.gamma_1 * self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias, grid=grid)
            )
            x = x + self.drop_path2(self.gamma_2 * self.mlp(self.norm2(x)))
        return x


class DynamicRelativePositionBias(RuntimeOptionsMixin, beit.RelativePositionBias):
    """timm's shared BEiT bias for the forward's patch grid (None: its own window)."""

    def forward(self, grid: Optional[List[int]] = None) -> torch.Tensor:
        if torch.jit.is_scripting():
            window = self.window_size
            if grid is not None and (grid[0] != window[0] or grid[1] != window[1]):
                return beit_rel_pos_bias(
                    self.relative_position_bias_table, [window[0], window[1]], grid, self.anysize_options().compat
                )
        else:
            bias = self._eager_bias_at(grid)
            if bias is not None:
                return bias
        relative_position_bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(
            self.window_area + 1, self.window_area + 1, -1
        )
        return relative_position_bias.permute(2, 0, 1).contiguous()

    @torch.jit.unused
    def _eager_bias_at(self, grid: Optional[List[int]]) -> Optional[torch.Tensor]:
        return _eager_bias(self, grid)


class DynamicBeit(RuntimeOptionsMixin, PrefixTokenIntermediates, beit.Beit):
    """timm's BEiT at any input size (set by :func:`timm_anysize.enable_dynamic`)."""

    def _anysize_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        """Tokens with the class token and the position embedding of the image's grid, and the grid."""
        ps = self.patch_embed.patch_size
        if not torch.jit.is_scripting():
            if hasattr(self.patch_embed, "active_patch_size"):  # a run-time patch size (timm_anysize.flexi)
                ps = self.patch_embed.active_patch_size()
        grid = patch_grid(x, [ps[0], ps[1]], self.patch_embed.dynamic_img_pad)
        x = self.patch_embed(x)  # tokens, as timm lays them out
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            native = self.patch_embed.grid_size
            x = x + self.pos_tokens_at(self.pos_embed, grid, [native[0], native[1]], self.num_prefix_tokens)
        return self.pos_drop(x), grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self._anysize_tokens(x)
        rel_pos_bias = self.rel_pos_bias(grid) if self.rel_pos_bias is not None else None
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, shared_rel_pos_bias=rel_pos_bias, grid=grid)
            else:
                x = blk(x, shared_rel_pos_bias=rel_pos_bias, grid=grid)
        return self.norm(x)

    def _intermediates_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[List[int], Optional[torch.Tensor]]]:
        x, grid = self._anysize_tokens(x)
        return x, (grid, self.rel_pos_bias(grid) if self.rel_pos_bias is not None else None)

    def _intermediates_block(
        self, i: int, blk: nn.Module, x: torch.Tensor, ctx: Tuple[List[int], Optional[torch.Tensor]]
    ) -> Tuple[torch.Tensor, Tuple[List[int], Optional[torch.Tensor]]]:
        grid, rel_pos_bias = ctx
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(blk, x, shared_rel_pos_bias=rel_pos_bias, grid=grid), ctx
        return blk(x, shared_rel_pos_bias=rel_pos_bias, grid=grid), ctx

    def _intermediates_feature(
        self, i: int, x: torch.Tensor, ctx: Tuple[List[int], Optional[torch.Tensor]], norm: bool, output_fmt: str
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        return token_features(self.norm(x) if norm else x, ctx[0], self.num_prefix_tokens, output_fmt)


_MODULES = {
    beit.Block: DynamicBeitBlock,
    beit.Attention: DynamicBeitAttention,
    beit.RelativePositionBias: DynamicRelativePositionBias,
}


def enable_beit_dynamic(model: beit.Beit, options: RuntimeOptions) -> None:
    """Swap in the dynamic classes, in place (the patch embedding is set up by the caller); the attentions and the
    shared bias take the model's run-time options (how a table is resized per grid: ``compat``; its cache)."""
    model.__class__ = DynamicBeit
    options = runtime_options(model)
    for module in swap_classes(model, _MODULES):
        if options is not None and isinstance(module, (DynamicBeitAttention, DynamicRelativePositionBias)):
            set_runtime_options(module, options)


FAMILIES = (
    Family(
        name="beit",
        dynamic_features=True,
        classes=(beit.Beit,),
        checkpoint_filter=beit.checkpoint_filter_fn,
        tensors=REL_TABLE,
        dynamic_args=(),  # timm's BEiT has no dynamic-size arguments; enable_dynamic adds the path
        runtime=DynamicPath(classes={beit.Beit: DynamicBeit}, setup=enable_beit_dynamic, patch_layout="tokens"),
        export_note="the bias table is resized by timm's interpolation over an offset grid computed in Python from "
        "the patch grid, which torch.export specializes to the example input's grid (and ONNX stops on "
        "a view with a symbolic token count); torch.compile(dynamic=True) equals eager (tested)",
        example="beit_base_patch16_224",
        tiny=TinyModel(
            dict(embed_dim=64, depth=2, num_heads=2),
            script_fx="tokens",
            conformance=gray_and_4ch(
                (96, 160), 144, patch_size=12, model_args=dict(embed_dim=64, depth=3, num_heads=2)
            ),
            multiple=16,
        ),
    ),
)
