"""The table of supported model families: what in each family depends on geometry, and how timm normalises its
checkpoints. Adding a family is one row here plus one row of tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch.nn as nn
from timm.models import deit, eva, vision_transformer

from .spec import Size2

__all__ = ["Family", "FAMILIES", "family_of"]

CheckpointFilter = Callable[[dict, nn.Module], dict]


@dataclass(frozen=True)
class Family:
    """Geometry-dependent parts of one family of timm models.

    Attributes:
        name: Short family name used in messages and reports.
        classes: Model classes of the family (exact types, not subclasses).
        checkpoint_filter: timm's own filter that normalises foreign checkpoint layouts (applied with a model at the
            *source* geometry, so it renames and reshapes but never resamples).
        pos_embed_key: State-dict key of the absolute position embedding laid out on the patch grid.
    """

    name: str
    classes: tuple[type, ...]
    checkpoint_filter: Optional[CheckpointFilter]
    pos_embed_key: str = "pos_embed"

    def grid_size(self, model: nn.Module) -> Size2:
        """The patch grid (H, W) the model was built for."""
        return tuple(model.patch_embed.grid_size)  # type: ignore[return-value]

    def patch_size(self, model: nn.Module) -> Size2:
        """The patch size (H, W) of the model's patch embedding."""
        return tuple(model.patch_embed.patch_size)  # type: ignore[return-value]

    def pos_embed_prefix_tokens(self, model: nn.Module) -> int:
        """How many leading entries of the position embedding belong to prefix tokens (kept aside on resample)."""
        if getattr(model, "no_embed_class", False):
            return 0
        return int(getattr(model, "num_prefix_tokens", 1))


FAMILIES: tuple[Family, ...] = (
    Family(
        name="vit",
        classes=(vision_transformer.VisionTransformer,),
        # adapt_layer_scale maps original DeiT-3 'gamma_N' keys; no timm-format key contains 'gamma_'.
        checkpoint_filter=partial(vision_transformer.checkpoint_filter_fn, adapt_layer_scale=True),
    ),
    Family(
        name="deit_distilled",
        classes=(deit.VisionTransformerDistilled,),
        checkpoint_filter=vision_transformer.checkpoint_filter_fn,
    ),
    Family(name="eva", classes=(eva.Eva,), checkpoint_filter=eva.checkpoint_filter_fn),
)


def family_of(model: nn.Module) -> Optional[Family]:
    """The family row for a model instance (or a dynamic subclass of one), or None if not supported."""
    for fam in FAMILIES:
        if any(type(model) is c or type(model).__bases__ == (c,) for c in fam.classes):
            return fam
    return None
