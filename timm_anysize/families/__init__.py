"""The supported families of timm models, one module each (like timm's own one-module-per-architecture layout).

Each module holds its family's :class:`~timm_anysize.core.family.Family` row(s) -- the geometry-dependent tensors, the
changes it cannot take, how it runs at any size -- next to its run-time code (dynamic subclasses, cached tables).
Adding a family is one new module here, named in ``_MODULES``, plus one row in tests/test_families.py's ``SETUP``.

Example:
    >>> import timm
    >>> family_of(timm.create_model("test_vit")).name
    'vit'
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from timm_anysize.core.family import GEOMETRY_CHANGES, Family, classify_changes, tensor_layouts
from timm_anysize.families import (
    beit, cait, convit, crossvit, deit, efficientformer, efficientformer_v2, eva, gcvit, gemma4_vit, hiera, levit,
    maxxvit, mlp_mixer, mvitv2, naflexvit, nest, pit, sam, swin, tnt, tresnet, twins, visformer, vit, volo, xcit,
)
from timm_anysize.families.generic import generic_family

__all__ = [
    "Family",
    "FAMILIES",
    "FAMILY_MODULES",
    "family_of",
    "generic_family",
    "GEOMETRY_CHANGES",
    "UNSUPPORTED",
    "classify_changes",
    "tensor_layouts",
]

# The order is the lookup order of family_of (a ViT hybrid is told from a ViT by its row's ``matches``).
FAMILY_MODULES = (vit, deit, eva, beit, cait, swin, pit, volo, levit, twins, xcit, hiera, mvitv2, crossvit, naflexvit,
            maxxvit, gcvit, sam, tnt, convit, efficientformer, efficientformer_v2, nest, mlp_mixer, gemma4_vit,
            tresnet, visformer)

FAMILIES: tuple[Family, ...] = tuple(row for module in FAMILY_MODULES for row in module.FAMILIES)


def family_of(model: nn.Module) -> Optional[Family]:
    """The family row for a model instance (or a dynamic subclass of one), or None if not supported."""
    cls = type(model)
    # Exact classes first: timm's DeiT-distilled class is a direct subclass of the ViT class, and must not be taken
    # for a ViT; a direct subclass (made by timm-anysize or a user) is looked up after.
    for exact in (True, False):
        for fam in FAMILIES:
            dynamic = fam.runtime.classes.values() if fam.runtime is not None else ()
            hit = (any(cls is c for c in fam.classes) or cls in dynamic) if exact else \
                any(cls.__bases__ == (c,) for c in fam.classes)
            if hit and (fam.matches is None or fam.matches(model)):
                return fam
    return None


# (family, change) -> why the architecture cannot take it. Checked when a spec is validated, before any weights are
# read (or built at the target geometry).
UNSUPPORTED: dict[tuple[str, str], str] = {
    (fam.name, change): reason for fam in FAMILIES for change, reason in fam.unsupported.items()
}
