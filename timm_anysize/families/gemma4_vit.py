"""Gemma 4's ViT: an ``nn.Linear`` patch projection over flattened ``(C, ph, pw)`` patches (viewed as its conv
kernel when the channels or the patch change) and a position table indexed by patch coordinates, which covers
any grid up to its size; timm's own forward runs at any size."""

import torch.nn as nn
from timm.models import gemma4_vit

from timm_anysize.core.family import Family, TinyModel, gray_and_4ch

__all__ = ["FAMILIES"]


def _position_one_hot_bytes(model: nn.Module) -> int:
    """timm's position embedding is a one-hot of each token's (x, y) over the table's positions, int64 and then in
    the table's dtype, times the table: per token, 2 x positions x (8 + 4) bytes (245,760 for Gemma 4's 10,240)."""
    positions = model.get_submodule("encoder.patch_embed").position_embedding_size
    return 2 * int(positions) * (8 + 4)


FAMILIES = (
    Family(
        name="gemma4_vit",
        dynamic_features=True,
        classes=(gemma4_vit.Gemma4VitClassifier,),
        tensors=(),  # position_embedding_table is indexed by patch coordinates: no geometry-bound tensor
        patch_embeds=("encoder.patch_embed",),
        linear_patch="chw",
        dynamic="native",
        whole_patches=True,  # timm's forward neither pads nor crops
        dynamic_args=(),
        attention_maps=4,  # timm passes a padding mask: scaled_dot_product_attention materialises the scores
        token_bytes=_position_one_hot_bytes,
        example="gemma4_vit_167m",
        tiny=TinyModel(
            dict(depth=2, embed_dim=64, num_heads=2, head_dim=32, intermediate_size=128),
            img_size=96,
            step=48,
            conformance=gray_and_4ch((96, 144), 128, patch_size=8),
            min_input=16,
            multiple=16,
            script_fx="",
            script_fx_note="its forward is timm's own (dynamic natively): timm's tests check it on the conformance "
            "variants",
        ),
    ),
)
