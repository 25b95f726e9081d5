"""Building MViTv2 at a non-square size, which timm's constructor refuses (it asserts a square feature map because
it sizes both relative-position axes from one side).

The model is built at H x H and each attention's ``rel_pos_w`` is replaced by a table of the length the width
needs (``2 * max(q, k) - 1`` along the width, as :mod:`timm_anysize.families.mvitv2` computes it); nothing else in
MViTv2 depends on the size it was built for, as its forward reads every size off the tokens. A model built this way
has per-axis tables in its state dict, so loading resizes each axis to its own length.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from timm.layers import trunc_normal_tf_
from timm.models import mvitv2

from .families.mvitv2 import table_lengths
from .spec import Size2

__all__ = ["is_square_only", "square_kwargs", "fit_width_tables", "create_square_only"]


def is_square_only(model_or_cls: Any) -> bool:
    """Whether timm builds this architecture at square sizes only (MViTv2)."""
    cls = model_or_cls if isinstance(model_or_cls, type) else type(model_or_cls)
    return issubclass(cls, mvitv2.MultiScaleVit)


def _size2(value: Any) -> Size2:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def square_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], Size2 | None]:
    """``kwargs`` with a non-square ``img_size`` replaced by its square H x H, and the requested size (or None)."""
    img = kwargs.get("img_size")
    if img is None or _size2(img)[0] == _size2(img)[1]:
        return kwargs, None
    h, w = _size2(img)
    return {**kwargs, "img_size": (h, h)}, (h, w)


def fit_width_tables(model: nn.Module, img_size: Size2) -> None:
    """Give every attention of an MViTv2 built at H x H the ``rel_pos_w`` length its width needs at ``img_size``."""
    conv = model.patch_embed.proj
    feat = tuple(
        (s + 2 * conv.padding[a] - conv.kernel_size[a]) // conv.stride[a] + 1 for a, s in enumerate(img_size)
    )
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
