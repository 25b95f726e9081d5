"""NaFlexViT: a ``[1, H, W, C]`` position embedding and an ``nn.Linear`` patch projection (viewed as its conv kernel
when the patch or the channels change); timm's own path runs at any size and pads with ``dynamic_img_pad``."""

from timm.models import naflexvit

from timm_anysize.core.family import Family

__all__ = ["FAMILIES"]


FAMILIES = (
    Family(
        name="naflexvit",
        dynamic_features=True,
        classes=(naflexvit.NaFlexVit,),
        tensors=(("embeds.pos_embed", "pos_nhwc"),),
        patch_embeds=("embeds",),
        linear_patch="hwc",
        first_conv="embeds.proj",
        dynamic="native",
        dynamic_args=("dynamic_img_pad",),  # NaFlexViT runs at any size; padding is its own option
        export_note="timm's patch embedding pads only inputs that are not whole patches, a branch torch.export "
                    "keeps as a guard from the example input (e.g. width % 16 == 0), so the program refuses the "
                    "other kind of size; torch.compile(dynamic=True) recompiles there instead (tested)",
        example="naflexvit_base_patch16_gap",
    ),
)
