"""Twins (PCPVT, SVT): position by convolution (PosConv), nothing laid out on a grid; timm's own path runs at any
size."""

from timm.models import twins

from ..family import Family

__all__ = ["FAMILIES"]


FAMILIES = (
    Family(
        name="twins",
        dynamic_features=True,
        classes=(twins.Twins,),
        tensors=(),  # position by convolution (PosConv): nothing on a grid
        patch_embeds=("patch_embeds.0",),
        dynamic="native",
        dynamic_args=(),
        example="twins_svt_small",
    ),
)
