"""EVA (EVA-02 and timm's other Eva-class models): the absolute position embedding resampled per grid and cached;
RoPE is generated for the grid by timm."""

from typing import List, Optional, Tuple

import torch
from timm.models import eva

from timm_anysize.core.family import DynamicPath, Family, TinyModel, gray_and_4ch
from timm_anysize.core.runtime_options import RuntimeOptionsMixin
from timm_anysize.families._shared import add_pos_embed

__all__ = ["FAMILIES", "DynamicEva"]


class DynamicEva(RuntimeOptionsMixin, eva.Eva):
    """timm's EVA with a cached dynamic absolute position embedding (RoPE is generated for the grid by timm)."""

    def _pos_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not torch.jit.is_scripting() and (
            self.pos_embed is None or not self.dynamic_img_size or self.patch_drop is not None
        ):
            return super()._pos_embed(x)
        B, H, W, C = x.shape
        rot_pos_embed = self.rope.get_embed(shape=[H, W]) if self.rope is not None else None
        prefix: List[torch.Tensor] = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(B, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(B, -1, -1))
        grid = self.patch_embed.grid_size
        prefix_len = 0 if self.no_embed_class else self.num_prefix_tokens
        pos_embed = self.pos_tokens_at(self.pos_embed, [H, W], [grid[0], grid[1]], prefix_len)
        x = add_pos_embed(x.view(B, -1, C), pos_embed, prefix, self.no_embed_class)
        return self.pos_drop(x), rot_pos_embed


FAMILIES = (
    Family(
        name="eva",
        dynamic_features=True,
        classes=(eva.Eva,),
        checkpoint_filter=eva.checkpoint_filter_fn,
        runtime=DynamicPath(classes={eva.Eva: DynamicEva}),
        example="eva02_tiny_patch14_224",
        tiny=TinyModel(
            dict(embed_dim=64, depth=2, num_heads=2),
            img_size=56,
            step=14,
            script_fx="tokens",
            conformance=gray_and_4ch((112, 168), 154, model_args=dict(embed_dim=64, depth=3, num_heads=2)),
            multiple=14,
        ),
    ),
)
