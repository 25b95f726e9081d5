"""MViTv2 at any input size, square or not: relative-position tables per axis, resized per feature size and cached.

timm's MViTv2 builds its ``rel_pos_h`` / ``rel_pos_w`` tables for one square feature size (its constructor asserts
a square input); its forward already reads every size off the tokens. A table has ``2 * max(q, k) - 1`` entries
along its axis, so another size needs tables of another length: here each axis gets its own, resized linearly (as
the original MViTv2 resizes them) from the trained table, once per size while the weights are unchanged (eager
mode). The attention's forward is timm's, with the tables for the ``feat_size`` it is given (an argument, so
threads, TorchScript and FX all see it); the resizing is a notrace leaf. At the model's own size every path is
timm's own, bit for bit.
"""

from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function, trunc_normal_tf_
from timm.models import mvitv2
from timm.models.mvitv2 import cal_rel_pos_type, reshape_post_pool, reshape_pre_pool

from timm_anysize.core.cache import cached_or_inline, traced
from timm_anysize.core.family import OVERLAPPING_STEM, DynamicPath, Family, TinyModel, gray_and_4ch, no_patch_change
from timm_anysize.core.runtime_options import RuntimeOptions, cache_for, swap_classes
from timm_anysize.core.spec import Size2, as_pair

__all__ = [
    "FAMILIES",
    "table_lengths",
    "enable_mvit_dynamic",
    "mvit_rel_table",
    "create_square_only",
    "fit_width_tables",
]


def _pool_geometry(pool: Optional[nn.Module]) -> List[int]:
    """``[kh, kw, sh, sw, ph, pw]`` of a pooling conv / pool, ``[]`` for none."""
    if pool is None:
        return []
    out: List[int] = []
    for name in ("kernel_size", "stride", "padding"):
        value = getattr(pool, name)
        out += [int(v) for v in as_pair(value)]
    return out


def _pooled(geometry: List[int], size: int, axis: int) -> int:
    """The size a pooling (``_pool_geometry``) gives along ``axis``: what the attention's q or k has."""
    if len(geometry) == 0:
        return size
    return (size + 2 * geometry[4 + axis] - geometry[axis]) // geometry[2 + axis] + 1


def _resize_axis(table: torch.Tensor, length: int, always: bool) -> torch.Tensor:
    """:func:`timm_anysize.core.resample.resize_rel_axis`, step for step, in a form TorchScript compiles."""
    if not always and table.shape[0] == length:
        return table
    out = F.interpolate(table.float().t()[None], size=length, mode="linear", align_corners=False)
    return out[0].t().to(table.dtype).contiguous()


@torch.fx.wrap
@register_notrace_function
def mvit_rel_table(
    table: torch.Tensor, feat: int, pool_q: List[int], pool_k: List[int], axis: int, always_resize: bool
) -> torch.Tensor:
    """One axis's relative-position table for a feature size ``feat`` along ``axis``: ``2 * max(q, k) - 1`` entries
    (q, k: the sizes the poolings give), resized linearly from the trained table (the table itself when it has
    that many, unless ``always_resize``: compiling, exporting, no branch on the size).

    Example:
        >>> mvit_rel_table(torch.randn(15, 8), 12, [3, 3, 1, 1, 1, 1], [3, 3, 2, 2, 1, 1], 0, False).shape
        torch.Size([23, 8])
    """
    length = 2 * max(_pooled(pool_q, feat, axis), _pooled(pool_k, feat, axis)) - 1
    return _resize_axis(table, length, always_resize)


def table_lengths(module: nn.Module, feat_size: Tuple[int, int]) -> Tuple[int, int]:
    """Entries each axis's table needs at ``feat_size``: ``2 * max(q, k) - 1`` along that axis, timm's rule with
    the sizes the pooling actually gives (equal to timm's ``size // stride`` where the stride divides the size);
    every index ``cal_rel_pos_type`` forms is then in range."""
    q, k = _pool_geometry(module.pool_q), _pool_geometry(module.pool_k)
    return tuple(2 * max(_pooled(q, f, a), _pooled(k, f, a)) - 1 for a, f in enumerate(feat_size))  # type: ignore


class _DynamicRelPos:
    """Tables for the feature size of the forward; the parameters themselves stay as trained."""

    def _anysize_tables(self, feat_size: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        if torch.jit.is_scripting():
            return (
                mvit_rel_table(self.rel_pos_h, feat_size[0], self._anysize_pool_q, self._anysize_pool_k, 0, False),
                mvit_rel_table(self.rel_pos_w, feat_size[1], self._anysize_pool_q, self._anysize_pool_k, 1, False),
            )
        return self._eager_table("rel_pos_h", feat_size[0], 0), self._eager_table("rel_pos_w", feat_size[1], 1)

    @torch.jit.unused
    def _eager_table(self, name: str, feat, axis: int) -> torch.Tensor:
        table = getattr(self, name)
        if isinstance(feat, torch.fx.Proxy) or traced():  # FX: one node; compiling, exporting: no size branch
            return mvit_rel_table(table, feat, self._anysize_pool_q, self._anysize_pool_k, axis, traced())
        length = table_lengths(self, (int(feat), int(feat)))[axis]
        if length == table.shape[0]:
            return table
        return cached_or_inline(cache_for(self, name), (length,), table, lambda: _resize_axis(table, length, False))


class DynamicMultiScaleAttention(_DynamicRelPos, mvitv2.MultiScaleAttention):
    """timm's MultiScaleAttention with relative-position tables for the feature size it is given."""

    def forward(self, x: torch.Tensor, feat_size: List[int]) -> Tuple[torch.Tensor, List[int]]:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(dim=0)
        if self.pool_q is not None:
            q, q_tok = reshape_pre_pool(q, feat_size, self.has_cls_token)
            q = self.pool_q(q)
            q, q_size = reshape_post_pool(q, self.num_heads, q_tok)
        else:
            q_size = feat_size
        if self.norm_q is not None:
            q = self.norm_q(q)
        if self.pool_k is not None:
            k, k_tok = reshape_pre_pool(k, feat_size, self.has_cls_token)
            k = self.pool_k(k)
            k, k_size = reshape_post_pool(k, self.num_heads, k_tok)
        else:
            k_size = feat_size
        if self.norm_k is not None:
            k = self.norm_k(k)
        if self.pool_v is not None:
            v, v_tok = reshape_pre_pool(v, feat_size, self.has_cls_token)
            v = self.pool_v(v)
            v, _ = reshape_post_pool(v, self.num_heads, v_tok)
        if self.norm_v is not None:
            v = self.norm_v(v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.rel_pos_type == "spatial":
            rel_pos_h, rel_pos_w = self._anysize_tables(feat_size)
            attn = cal_rel_pos_type(attn, q, self.has_cls_token, q_size, k_size, rel_pos_h, rel_pos_w)
        attn = attn.softmax(dim=-1)
        x = attn @ v
        if self.residual_pooling:
            x = x + q
        x = x.transpose(1, 2).reshape(B, -1, self.dim_out)
        x = self.proj(x)
        return x, q_size


class DynamicMultiScaleAttentionPoolFirst(_DynamicRelPos, mvitv2.MultiScaleAttentionPoolFirst):
    """timm's MultiScaleAttentionPoolFirst with relative-position tables for the feature size it is given."""

    def forward(self, x: torch.Tensor, feat_size: List[int]) -> Tuple[torch.Tensor, List[int]]:
        B, N, _ = x.shape
        fold_dim = 1 if self.unshared else self.num_heads
        x = x.reshape(B, N, fold_dim, -1).permute(0, 2, 1, 3)
        q = k = v = x
        if self.pool_q is not None:
            q, q_tok = reshape_pre_pool(q, feat_size, self.has_cls_token)
            q = self.pool_q(q)
            q, q_size = reshape_post_pool(q, self.num_heads, q_tok)
        else:
            q_size = feat_size
        if self.norm_q is not None:
            q = self.norm_q(q)
        if self.pool_k is not None:
            k, k_tok = reshape_pre_pool(k, feat_size, self.has_cls_token)
            k = self.pool_k(k)
            k, k_size = reshape_post_pool(k, self.num_heads, k_tok)
        else:
            k_size = feat_size
        if self.norm_k is not None:
            k = self.norm_k(k)
        if self.pool_v is not None:
            v, v_tok = reshape_pre_pool(v, feat_size, self.has_cls_token)
            v = self.pool_v(v)
            v, v_size = reshape_post_pool(v, self.num_heads, v_tok)
        else:
            v_size = feat_size
        if self.norm_v is not None:
            v = self.norm_v(v)
        q_N = q_size[0] * q_size[1] + int(self.has_cls_token)
        q = q.transpose(1, 2).reshape(B, q_N, -1)
        q = self.q(q).reshape(B, q_N, self.num_heads, -1).transpose(1, 2)
        k_N = k_size[0] * k_size[1] + int(self.has_cls_token)
        k = k.transpose(1, 2).reshape(B, k_N, -1)
        k = self.k(k).reshape(B, k_N, self.num_heads, -1)
        v_N = v_size[0] * v_size[1] + int(self.has_cls_token)
        v = v.transpose(1, 2).reshape(B, v_N, -1)
        v = self.v(v).reshape(B, v_N, self.num_heads, -1).transpose(1, 2)
        attn = (q * self.scale) @ k
        if self.rel_pos_type == "spatial":
            rel_pos_h, rel_pos_w = self._anysize_tables(feat_size)
            attn = cal_rel_pos_type(attn, q, self.has_cls_token, q_size, k_size, rel_pos_h, rel_pos_w)
        attn = attn.softmax(dim=-1)
        x = attn @ v
        if self.residual_pooling:
            x = x + q
        x = x.transpose(1, 2).reshape(B, -1, self.dim_out)
        x = self.proj(x)
        return x, q_size


_MODULES = {
    mvitv2.MultiScaleAttention: DynamicMultiScaleAttention,
    mvitv2.MultiScaleAttentionPoolFirst: DynamicMultiScaleAttentionPoolFirst,
}


def enable_mvit_dynamic(model: nn.Module, options: RuntimeOptions) -> None:
    """Swap in the attention classes whose tables follow the feature size."""
    for module in swap_classes(model, _MODULES, options, where=lambda m: getattr(m, "rel_pos_type", "") == "spatial"):
        module._anysize_pool_q = _pool_geometry(module.pool_q)
        module._anysize_pool_k = _pool_geometry(module.pool_k)


# Building at a non-square size, which timm's constructor refuses (it asserts a square feature map because it sizes
# both relative-position axes from one side): the model is built at H x H and each attention's ``rel_pos_w`` is
# replaced by a table of the length the width needs. Nothing else in MViTv2 depends on the size it was built for, as
# its forward reads every size off the tokens; such a model has per-axis tables in its state dict, so loading resizes
# each axis to its own length.


def square_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], Size2 | None]:
    """``kwargs`` with a non-square ``img_size`` replaced by its square H x H, and the requested size (or None)."""
    img = kwargs.get("img_size")
    if img is None or as_pair(img)[0] == as_pair(img)[1]:
        return kwargs, None
    h, w = (int(v) for v in as_pair(img))
    return {**kwargs, "img_size": (h, h)}, (h, w)


def fit_width_tables(model: nn.Module, img_size: Size2) -> None:
    """Give every attention of an MViTv2 built at H x H the ``rel_pos_w`` length its width needs at ``img_size``."""
    conv = model.patch_embed.proj
    feat = tuple((s + 2 * conv.padding[a] - conv.kernel_size[a]) // conv.stride[a] + 1 for a, s in enumerate(img_size))
    for stage in model.stages:
        for block in stage.blocks:
            attn = block.attn
            if getattr(attn, "rel_pos_type", "") == "spatial":
                length = table_lengths(attn, feat)[1]
                old = attn._parameters["rel_pos_w"]
                if old.shape[0] != length:
                    new = nn.Parameter(torch.empty(length, old.shape[1], device=old.device, dtype=old.dtype))
                    if new.device.type != "meta":
                        trunc_normal_tf_(new, std=0.02)  # timm's init of the tables
                    attn.rel_pos_w = new
            if attn.pool_q is not None:  # the block's output has the pooled query's size
                q = attn.pool_q
                feat = tuple(
                    (f + 2 * _at(q.padding, a) - _at(q.kernel_size, a)) // _at(q.stride, a) + 1
                    for a, f in enumerate(feat)
                )


def _at(value: Any, axis: int) -> int:
    return int(value) if isinstance(value, int) else int(value[axis])


def create_square_only(create: Callable[..., nn.Module], kwargs: dict[str, Any]) -> nn.Module:
    """``create(**kwargs)`` for a square-only architecture at any size: square build, then the width tables."""
    square, requested = square_kwargs(kwargs)
    model = create(**square)
    if requested is not None:
        fit_width_tables(getattr(model, "model", model), requested)  # a feature wrapper holds the model
    return model


def _total_stride(model: nn.Module) -> int:
    """timm's tables are sized for ``img // stride`` tokens at each stage; the stem and pooling convolutions give
    ``ceil(img / stride)``: the two agree (and timm's own model runs) only at multiples of the total stride."""
    return int(model.feature_info[-1]["reduction"])


FAMILIES = (
    Family(
        name="mvitv2",
        dynamic_features=True,
        classes=(mvitv2.MultiScaleVit,),
        tensors=(("*.rel_pos_h", "rel_axis"), ("*.rel_pos_w", "rel_axis")),
        unsupported=no_patch_change(OVERLAPPING_STEM.format(name="MViTv2")),
        square_only=True,  # timm asserts a square size; non-square variants get per-axis tables
        static_multiple=_total_stride,
        build=create_square_only,
        dynamic_args=(),  # enable_dynamic resizes the tables per feature size
        runtime=DynamicPath(  # the model class stays; its attentions change
            classes={mvitv2.MultiScaleVit: mvitv2.MultiScaleVit}, setup=enable_mvit_dynamic, patch_layout="none"
        ),
        onnx_note="timm's relative-position indexing multiplies by a Python float ratio of symbolic sizes "
        "(max(k / q, 1.0)), which the ONNX exporter cannot convert (torch 2.14)",
        example="mvitv2_tiny",
        tiny=TinyModel(
            step=32,
            feature_indices=(0, 1, 2),
            script_fx="windows",  # full width: no size args
            fx_features_note="timm names its feature modules 'block.k' (the modules are 'stages.k'): plain timm's fx "
            "and hook feature extractors fail on them too",
            built_note="timm builds MViTv2 square only, so no timm model takes the variant's non-square weights as "
            "its source (tests/test_families.py checks a non-square variant's per-axis tables)",
            conformance=gray_and_4ch((64, 96), 160),
            base="anysize_tiny_mvitv2",
        ),
    ),
)
