"""GCViT (timm's ``gcvit``): one relative-position bias table per window attention, windows derived from img_size.

timm sizes each stage's window from the image (``img_size / window_ratio``, ratios 32, 32, 16, 32 by default) and
builds every attention's bias table for it; its global query is the stage's feature map max-pooled down to the
window. A load at another size resizes each table between the windows its attention has in the two models, with
timm's ``resize_rel_pos_bias_table`` (timm has no checkpoint filter or ``set_input_size`` for GCViT).
"""

from timm.models import gcvit

from ..family import NO_CONV_PATCH, REL_TABLE, Family, no_patch_change

__all__ = ["FAMILIES"]


FAMILIES = (
    Family(
        name="gcvit",
        classes=(gcvit.GlobalContextVit,),
        tensors=REL_TABLE,
        patch_embeds=(),
        unsupported=no_patch_change(NO_CONV_PATCH),
        dynamic="",
        dynamic_args=(),
        dynamic_reason="timm partitions every stage into windows sized from img_size at construction",
        example="gcvit_xxtiny",
    ),
)
