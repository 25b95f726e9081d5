"""Distilled DeiT (class + distillation tokens): the token position embedding resampled per grid and cached."""

import torch
from timm.models import deit, vision_transformer

from timm_anysize.core.family import DynamicPath, Family, TinyModel, gray_and_4ch
from timm_anysize.core.runtime_options import RuntimeOptionsMixin
from timm_anysize.families._shared import add_pos_embed

__all__ = ["FAMILIES", "DynamicVisionTransformerDistilled"]


class DynamicVisionTransformerDistilled(RuntimeOptionsMixin, deit.VisionTransformerDistilled):
    """timm's distilled DeiT with a cached dynamic position embedding."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not self.dynamic_img_size:
            return super()._pos_embed(x)
        B, H, W, C = x.shape
        prefix = [self.cls_token.expand(B, -1, -1), self.dist_token.expand(B, -1, -1)]
        grid = self.patch_embed.grid_size
        prefix_len = 0 if self.no_embed_class else self.num_prefix_tokens
        pos_embed = self.pos_tokens_at(self.pos_embed, [H, W], [grid[0], grid[1]], prefix_len)
        x = add_pos_embed(x.view(B, -1, C), pos_embed, prefix, self.no_embed_class)
        return self.pos_drop(x)


FAMILIES = (
    Family(
        name="deit_distilled",
        dynamic_features=True,
        classes=(deit.VisionTransformerDistilled,),
        checkpoint_filter=vision_transformer.checkpoint_filter_fn,
        runtime=DynamicPath(classes={deit.VisionTransformerDistilled: DynamicVisionTransformerDistilled}),
        example="deit_tiny_distilled_patch16_224",
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
