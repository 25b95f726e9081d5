"""MViTv2 at any input size, square or not: relative-position tables per axis, resized per feature size and cached.

timm's MViTv2 builds its ``rel_pos_h`` / ``rel_pos_w`` tables for one square feature size (its constructor asserts
a square input); its forward already reads every size off the tokens. A table has ``2 * max(q, k) - 1`` entries
along its axis, so another size needs tables of another length: here each axis gets its own, resized linearly (as
the original MViTv2 resizes them) from the trained table, once per size while the weights are unchanged. The
feature size of the current forward reaches the tables through a context variable (thread-safe). At the model's
own size every path is timm's own, bit for bit.
"""

from __future__ import annotations

import contextvars
from typing import Optional

import torch
import torch.nn as nn
from timm.models import mvitv2

from ..cache import PosEmbedCache, must_run_inline
from ..resample import resize_rel_axis
from ..spec import Size2
from ..family import OVERLAPPING_STEM, DynamicPath, Family, no_patch_change

__all__ = ["FAMILIES", "table_lengths", "enable_mvit_dynamic"]

_FEAT: contextvars.ContextVar[Optional[Size2]] = contextvars.ContextVar("anysize_mvit_feat", default=None)


def _pooled(pool: Optional[nn.Module], size: int, axis: int) -> int:
    """The size a pooling conv / pool gives along ``axis``: what the attention's q or k has."""
    if pool is None:
        return size

    def at(value) -> int:
        return int(value) if isinstance(value, int) else int(value[axis])

    return (size + 2 * at(pool.padding) - at(pool.kernel_size)) // at(pool.stride) + 1


def table_lengths(module: nn.Module, feat_size: Size2) -> Size2:
    """Entries each axis's table needs at ``feat_size``: ``2 * max(q, k) - 1`` along that axis, timm's rule with
    the sizes the pooling actually gives (equal to timm's ``size // stride`` where the stride divides the size);
    every index ``cal_rel_pos_type`` forms is then in range."""
    return tuple(  # type: ignore[return-value]
        2 * max(_pooled(module.pool_q, f, a), _pooled(module.pool_k, f, a)) - 1 for a, f in enumerate(feat_size)
    )


class _DynamicRelPos:
    """Tables for the feature size of the current forward; the parameters themselves stay as trained."""

    def forward(self, x: torch.Tensor, feat_size):
        token = _FEAT.set((int(feat_size[0]), int(feat_size[1])))
        try:
            return super().forward(x, feat_size)
        finally:
            _FEAT.reset(token)

    def _table(self, name: str, axis: int) -> torch.Tensor:
        table = self._parameters[name]
        feat = _FEAT.get()
        if feat is None:
            return table
        length = table_lengths(self, feat)[axis]
        if length == table.shape[0]:
            return table
        if must_run_inline(table):
            return resize_rel_axis(table, length)
        key = (length, table.dtype, table.device, torch.is_inference_mode_enabled())
        cache = self._anysize_caches[name]
        return cache.get_or_compute(key, table, lambda: resize_rel_axis(table, length).detach())

    @property
    def rel_pos_h(self) -> torch.Tensor:
        return self._table("rel_pos_h", 0)

    @property
    def rel_pos_w(self) -> torch.Tensor:
        return self._table("rel_pos_w", 1)


class DynamicMultiScaleAttention(_DynamicRelPos, mvitv2.MultiScaleAttention):
    pass


class DynamicMultiScaleAttentionPoolFirst(_DynamicRelPos, mvitv2.MultiScaleAttentionPoolFirst):
    pass


_MODULES = {
    mvitv2.MultiScaleAttention: DynamicMultiScaleAttention,
    mvitv2.MultiScaleAttentionPoolFirst: DynamicMultiScaleAttentionPoolFirst,
}


def enable_mvit_dynamic(model: nn.Module, cache_size: int) -> None:
    """Swap in the attention classes whose tables follow the feature size."""
    for module in model.modules():
        dynamic_cls = _MODULES.get(type(module))
        if dynamic_cls is not None and getattr(module, "rel_pos_type", "") == "spatial":
            module.__class__ = dynamic_cls
            module._anysize_caches = {n: PosEmbedCache(cache_size) for n in ("rel_pos_h", "rel_pos_w")}


FAMILIES = (
    Family(
        name="mvitv2",
        dynamic_features=True,
        classes=(mvitv2.MultiScaleVit,),
        tensors=(("*.rel_pos_h", "rel_axis"), ("*.rel_pos_w", "rel_axis")),
        unsupported=no_patch_change(OVERLAPPING_STEM.format(name="MViTv2")),
        square_only=True,  # timm asserts a square size; non-square variants get per-axis tables
        dynamic_args=(),  # enable_dynamic resizes the tables per feature size
        runtime=DynamicPath(  # the model class stays; its attentions change
            classes={mvitv2.MultiScaleVit: mvitv2.MultiScaleVit}, setup=enable_mvit_dynamic, patch_layout="none"
        ),
        example="mvitv2_tiny",
    ),
)
