"""MaxViT, CoAtNet and MaxxViT (timm's ``maxxvit``): relative-position biases tied to the partition sizes.

timm derives each MaxViT block's window and grid partition from the image size (``img_size / partition_ratio``,
32 by default) and each CoAtNet transformer stage's window from its whole feature map, and builds one bias table
per attention for it (``rel_pos_type`` ``bias``: a flat ``[(2Wh-1)(2Ww-1), heads]`` table; ``bias_tf``: a
``[heads, 2Wh-1, 2Ww-1]`` table; ``mlp``: an MLP over log coordinates, nothing to resize). A load at another size
resizes each table between the windows its attention has in the two models, as timm's own ``set_input_size`` does.
"""

from timm.models import maxxvit

from ..family import NO_CONV_PATCH, REL_TABLE, Family, no_patch_change

__all__ = ["FAMILIES"]


FAMILIES = (
    Family(
        name="maxxvit",
        classes=(maxxvit.MaxxVit,),
        checkpoint_filter=maxxvit.checkpoint_filter_fn,
        tensors=REL_TABLE,
        patch_embeds=(),
        unsupported=no_patch_change(NO_CONV_PATCH),
        dynamic="",
        dynamic_args=(),
        dynamic_reason="timm partitions every stage into windows sized from img_size at construction",
        example="maxvit_nano_rw_256",
    ),
)
