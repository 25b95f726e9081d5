"""What weights or a model are shaped for: the :class:`Geometry` of both sides of a variant, the layout of each
geometry-dependent tensor between them (:class:`TensorResample`), and which of the geometry changes a family row is
described in (:data:`~timm_anysize.core.family.GEOMETRY_CHANGES`) a source -> target geometry makes.

Plain data, read off timm models by :mod:`timm_anysize.model_geometry` and carried by the
:class:`~timm_anysize.core.variant_plan.VariantPlan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from timm_anysize.core.spec import Size2

__all__ = ["Geometry", "TensorResample", "classify_changes"]


@dataclass(frozen=True)
class Geometry:
    """What the weights or the model are shaped for.

    Example:
        >>> g = Geometry((64, 64), (4, 4), (16, 16), in_chans=1, num_classes=10, num_prefix_tokens=1)
        >>> g.describe(), g.compact(), g.num_tokens
        ('64x64 px, patch 4x4, grid 16x16 (+1 prefix), 1 ch, 10 classes', '64x64/p4x4/1ch/10cls', 257)
    """

    img_size: Size2
    patch_size: Optional[Size2]  # None: a conv stem with no patch size to change
    grid_size: Optional[Size2]  # None: no single patch grid (e.g. LeViT's conv stem)
    in_chans: int
    num_classes: int
    num_prefix_tokens: int

    def describe(self) -> str:
        """One line, e.g. ``64x64 px, patch 4x4, grid 16x16 (+1 prefix), 1 ch, 10 classes``."""
        (h, w) = self.img_size
        parts = [f"{h}x{w} px"]
        if self.patch_size is not None:
            parts.append(f"patch {self.patch_size[0]}x{self.patch_size[1]}")
        if self.grid_size is not None:
            parts.append(f"grid {self.grid_size[0]}x{self.grid_size[1]} (+{self.num_prefix_tokens} prefix)")
        return ", ".join(parts + [f"{self.in_chans} ch", f"{self.num_classes} classes"])

    def compact(self) -> str:
        """``64x64/p4x4/1ch/10cls`` (the patch left out where the family has none)."""
        patch = f"/p{self.patch_size[0]}x{self.patch_size[1]}" if self.patch_size else ""
        return f"{self.img_size[0]}x{self.img_size[1]}{patch}/{self.in_chans}ch/{self.num_classes}cls"

    @property
    def num_tokens(self) -> int:
        """Tokens at the first stage: patches (of the patch size where the model keeps no grid, at stride 4 where it
        has neither) plus prefix tokens."""
        ph, pw = self.patch_size or (4, 4)
        gh, gw = self.grid_size or (self.img_size[0] // ph, self.img_size[1] // pw)
        return gh * gw + self.num_prefix_tokens


@dataclass(frozen=True)
class TensorResample:
    """How one geometry-dependent tensor maps between the source and the target layout.

    ``source``/``target`` are the grids (position embeddings, attention-bias grids) or windows (relative-position
    tables) read off the two models; ``prefix`` the leading entries kept aside (token position embeddings).
    """

    kind: str
    source: tuple[int, ...]
    target: tuple[int, ...]
    prefix: int = 0

    @property
    def changes(self) -> bool:
        return self.source != self.target


def classify_changes(source: Geometry, target: Geometry) -> list[str]:
    """The :data:`~timm_anysize.core.family.GEOMETRY_CHANGES` a source -> target geometry makes.

    Example:
        >>> src = Geometry((224, 224), (16, 16), (14, 14), 3, 1000, 1)
        >>> classify_changes(src, Geometry((64, 96), (8, 8), (8, 12), 1, 10, 1))
        ['img_non_square', 'patch_smaller', 'in_chans_1']
    """
    out = []
    if target.img_size != source.img_size:
        out.append("img_non_square" if target.img_size[0] != target.img_size[1] else "img_larger")
    if target.patch_size is not None and target.patch_size != source.patch_size:
        smaller = source.patch_size is not None and target.patch_size[0] < source.patch_size[0]
        out.append("patch_smaller" if smaller else "patch_larger")
    if target.in_chans != source.in_chans:
        out.append("in_chans_1" if target.in_chans == 1 else "in_chans_4")
    return out
