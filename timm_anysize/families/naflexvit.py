"""NaFlexViT: a ``[1, H, W, C]`` position embedding and an ``nn.Linear`` patch projection (viewed as its conv kernel
when the patch or the channels change); timm's own path runs at any size and pads with ``dynamic_img_pad``."""

from timm.models import naflexvit

from ..family import Family

__all__ = ["FAMILIES"]


FAMILIES = (
    Family(
        name="naflexvit",
        dynamic_features=True,
        classes=(naflexvit.NaFlexVit,),
        tensors=(("embeds.pos_embed", "pos_nhwc"),),
        patch_embeds=("embeds",),
        linear_patch=True,
        first_conv="embeds.proj",
        dynamic="native",
        dynamic_args=("dynamic_img_pad",),  # NaFlexViT runs at any size; padding is its own option
        example="naflexvit_base_patch16_gap",
    ),
)
