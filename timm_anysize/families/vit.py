"""ViT (timm's VisionTransformer, incl. registers and ``no_embed_class``) and ViT hybrids (a CNN stem, e.g.
ViTamin): the token position embedding resampled per patch grid and cached (:mod:`timm_anysize.core.cache`).

timm's ``dynamic_img_size=True`` re-interpolates the position embedding on every forward; here it is computed once
per grid and reused while the weights are unchanged. The only timm behaviour replaced is where ``_pos_embed`` gets
the embedding from; the token layout is timm's own (pinned by a test against timm's dynamic path).
"""

from functools import partial
from typing import List

import torch
import torch.nn as nn
from timm.layers import HybridEmbed
from timm.models import vision_transformer

from timm_anysize.core.family import DynamicPath, Family, TinyModel, gray_and_4ch, no_patch_change
from timm_anysize.core.runtime_options import RuntimeOptionsMixin
from timm_anysize.families._shared import add_pos_embed

__all__ = ["FAMILIES", "DynamicVisionTransformer"]


# Eager code (``super()``) sits behind ``not is_scripting()``; the position embedding of the grid comes from the one
# scripting-or-cached branch of RuntimeOptionsMixin.


class DynamicVisionTransformer(RuntimeOptionsMixin, vision_transformer.VisionTransformer):
    """timm's VisionTransformer with a cached dynamic position embedding (set by :func:`enable_dynamic`)."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and (self.pos_embed is None or not self.dynamic_img_size):
            return super()._pos_embed(x)
        B, H, W, C = x.shape
        prefix: List[torch.Tensor] = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(B, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(B, -1, -1))
        grid = self.patch_embed.grid_size
        prefix_len = 0 if self.no_embed_class else self.num_prefix_tokens
        pos_embed = self.pos_tokens_at(self.pos_embed, [H, W], [grid[0], grid[1]], prefix_len)
        x = add_pos_embed(x.view(B, -1, C), pos_embed, prefix, self.no_embed_class)
        return self.pos_drop(x)


def _is_hybrid(model: nn.Module) -> bool:
    return isinstance(getattr(model, "patch_embed", None), HybridEmbed)


_RUNTIME = DynamicPath(classes={vision_transformer.VisionTransformer: DynamicVisionTransformer})

FAMILIES = (
    Family(
        name="vit",
        dynamic_features=True,
        classes=(vision_transformer.VisionTransformer,),
        # adapt_layer_scale maps original DeiT-3 'gamma_N' keys; no timm-format key contains 'gamma_'.
        checkpoint_filter=partial(vision_transformer.checkpoint_filter_fn, adapt_layer_scale=True),
        runtime=_RUNTIME,
        example="test_vit",
        tiny=TinyModel(
            img_size=160,
            script_fx="tokens",  # test_vit is already tiny
            conformance=gray_and_4ch((96, 160), 144, patch_size=12),
            multiple=16,
        ),
        matches=lambda m: not _is_hybrid(m),
    ),
    Family(
        name="vit_hybrid",
        dynamic_features=True,
        classes=(vision_transformer.VisionTransformer,),
        checkpoint_filter=vision_transformer.checkpoint_filter_fn,
        unsupported=no_patch_change(
            "the patch is the stride of a CNN stem (ViTamin, ResNet hybrids), not a kernel to resize"
        ),
        runtime=_RUNTIME,
        example="vitamin_small_224",
        tiny=TinyModel(
            dict(depth=1),
            feature_indices=(0,),
            script_fx="tokens",  # depth 1: one feature level
            conformance=gray_and_4ch((64, 96), 144),
        ),
        matches=_is_hybrid,
    ),
)
