"""Named presets of how other libraries resample a token position embedding, used at load time and at run time.

Each library interpolates the position grid its own way; reproducing an origin model at a new size needs its exact
choice. ``timm`` (the default) is timm's own `resample_abs_pos_embed`; the others are one `F.interpolate` call each,
reproduced from the library's code:

- ``torchvision``: ``interpolate_embeddings`` -- bicubic, ``align_corners=True``, no antialias.
- ``transformers``: ``interpolate_pos_encoding`` of ViT/DeiT/DINOv2/BEiT/Swin -- bicubic, ``align_corners=False``,
  no antialias (transformers' ``Dinov2WithRegisters`` antialiases: that is the ``timm`` preset).
- ``mmpretrain``: ``resize_pos_embed`` -- bicubic, no antialias; DeiT's two extra tokens pass through untouched.
- ``dino``: DINO / DINOv2 ``interpolate_pos_encoding`` -- bicubic with ``scale_factor=(n + 0.1) / M`` (the
  offset that avoids a floating-point off-by-one), no antialias.
- ``big_vision``: ``resample_posemb`` of big_vision's ViT -- ``scipy.ndimage.zoom(grid, zoom, order=1)``, which is
  bilinear with ``align_corners=True`` and no antialias (equal to float rounding; pinned by a test against scipy).

Relative-position bias tables (BEiT) follow the preset too: ``transformers`` resizes them bilinearly as its
``BeitRelativePositionBias`` does; the other libraries never resize one, so their presets keep timm's resize.
Everything here is scriptable: the dynamic forward calls it under TorchScript, FX and torch.compile as in eager.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

__all__ = [
    "PosEmbedCompat",
    "COMPAT_PRESETS",
    "compat_preset",
    "compat_interpolation",
    "compat_rel_table",
    "compat_resample_pos_embed",
    "compat_resize_rel_table",
]


def compat_interpolation(compat: str) -> Tuple[str, bool, bool, float]:
    """``(mode, antialias, align_corners, scale_offset)`` of a preset other than ``timm``; ``scale_offset`` 0: the
    grid is interpolated to a ``size``, else with ``scale_factor=(new + offset) / old`` (DINO). Scriptable: the
    presets below and every resampling function of this module read it, so there is one source of these numbers.

    Example:
        >>> compat_interpolation("torchvision")
        ('bicubic', False, True, 0.0)
    """
    if compat == "torchvision":
        return "bicubic", False, True, 0.0
    if compat == "transformers" or compat == "mmpretrain":
        return "bicubic", False, False, 0.0
    if compat == "dino":
        return "bicubic", False, False, 0.1
    if compat == "big_vision":  # scipy.ndimage.zoom(order=1): linear, corner samples aligned, no prefilter
        return "bilinear", False, True, 0.0
    if compat == "timm":
        return "bicubic", True, False, 0.0
    raise ValueError("unknown position-embedding compat " + compat)


def compat_rel_table(compat: str) -> str:
    """How a preset resizes relative-position bias tables: ``bilinear`` (transformers' BEiT: ``F.interpolate`` over
    the ``(2H-1) x (2W-1)`` offsets), else ``timm`` (timm's ``resize_rel_pos_bias_table``; the other libraries never
    resize such a table). Scriptable.

    Example:
        >>> compat_rel_table("transformers"), compat_rel_table("dino")
        ('bilinear', 'timm')
    """
    return "bilinear" if compat == "transformers" else "timm"


@dataclass(frozen=True)
class PosEmbedCompat:
    """One library's way of resampling a position grid.

    Attributes:
        name: Preset name (``adapt.pos_embed.compat``).
        mode: ``F.interpolate`` mode.
        antialias: Anti-alias when downsampling.
        align_corners: ``F.interpolate``'s ``align_corners``.
        scale_offset: If set, interpolate with ``scale_factor=(new + offset) / old`` instead of ``size`` (DINO).
        rel_table: How relative-position bias tables are resized (:func:`compat_rel_table`).
        where: The code reproduced, for reports and docs.
    """

    name: str
    mode: str
    antialias: bool
    align_corners: Optional[bool]
    scale_offset: Optional[float] = None
    rel_table: str = "timm"
    where: str = ""

    @classmethod
    def named(cls, name: str, where: str) -> "PosEmbedCompat":
        mode, antialias, align_corners, offset = compat_interpolation(name)
        return cls(name, mode, antialias, align_corners, offset or None, compat_rel_table(name), where)

    def describe(self) -> str:
        """One line for reports, e.g. ``compat torchvision: bicubic, align_corners=True, antialias=False``."""
        how = f"scale_factor (n+{self.scale_offset})/M" if self.scale_offset is not None else "size"
        tables = ", bias tables bilinear" if self.rel_table == "bilinear" else ""
        return (
            f"compat {self.name}: {self.mode}, align_corners={self.align_corners}, antialias={self.antialias}, "
            f"{how}{tables}"
        )


COMPAT_PRESETS: dict[str, PosEmbedCompat] = {
    p.name: p
    for p in (
        PosEmbedCompat.named("timm", "timm.layers.resample_abs_pos_embed"),
        PosEmbedCompat.named("torchvision", "torchvision.models.vision_transformer.interpolate_embeddings"),
        PosEmbedCompat.named(
            "transformers",
            "transformers ViT/DeiT/Dinov2/Beit/Swin embeddings.interpolate_pos_encoding and BeitRelativePositionBias",
        ),
        PosEmbedCompat.named("mmpretrain", "mmpretrain.models.utils.resize_pos_embed"),
        PosEmbedCompat.named("dino", "facebookresearch/dino and dinov2 VisionTransformer.interpolate_pos_encoding"),
        PosEmbedCompat.named("big_vision", "big_vision models/vit.py resample_posemb (scipy.ndimage.zoom, order=1)"),
    )
}


def compat_preset(name: str) -> PosEmbedCompat:
    """The preset called ``name``.

    Raises:
        ValueError: Unknown name; lists the presets.

    Example:
        >>> compat_preset("torchvision").align_corners
        True
    """
    try:
        return COMPAT_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown position-embedding compat {name!r}; choose one of {', '.join(COMPAT_PRESETS)}"
        ) from None


def compat_resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: List[int],
    old_grid: List[int],
    num_prefix_tokens: int,
    compat: str,
) -> torch.Tensor:
    """Resample ``[1, prefix + H*W, C]`` from ``old_grid`` to ``new_grid`` exactly as the library ``compat`` does.

    The prefix tokens (class, distillation, registers) pass through; the grid is interpolated in float32 and cast
    back, as transformers, MMPretrain and DINOv2 do. Scriptable (the dynamic paths call it under TorchScript).

    Example:
        >>> pe = torch.randn(1, 1 + 4 * 4, 8)
        >>> compat_resample_pos_embed(pe, [6, 3], [4, 4], 1, "dino").shape
        torch.Size([1, 19, 8])
    """
    new_h, new_w, old_h, old_w = int(new_grid[0]), int(new_grid[1]), int(old_grid[0]), int(old_grid[1])
    if compat == "timm":
        return resample_abs_pos_embed(
            pos_embed,
            new_size=[new_h, new_w],
            old_size=[old_h, old_w],
            num_prefix_tokens=num_prefix_tokens,
            interpolation="bicubic",
            antialias=True,
        )
    mode, antialias, align_corners, offset = compat_interpolation(compat)
    if new_h == old_h and new_w == old_w:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    img = grid.reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2).float()
    if offset != 0.0:
        out = F.interpolate(
            img,
            scale_factor=[(new_h + offset) / old_h, (new_w + offset) / old_w],
            mode=mode,
            align_corners=align_corners,
            antialias=antialias,
        )
    else:
        out = F.interpolate(img, size=[new_h, new_w], mode=mode, align_corners=align_corners, antialias=antialias)
    if out.shape[-2] != new_h or out.shape[-1] != new_w:  # DINO's offset makes the floor land on the grid; guard
        raise ValueError("compat " + compat + ": the resampled grid does not have the requested size")
    out = out.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, out], dim=1)


def compat_resize_rel_table(table: torch.Tensor, old_window: List[int], new_window: List[int]) -> torch.Tensor:
    """A relative-position bias table ``[(2h-1)(2w-1) + extra, heads]`` resized between windows as transformers'
    ``BeitRelativePositionBias`` does: bilinear ``F.interpolate`` (no antialias, ``align_corners=False``) of the
    offsets, the ``extra`` class-token entries kept. Like transformers it reads the old table as ``(2w-1, 2h-1)``
    (the same for the square windows it is trained at). Scriptable.

    Example:
        >>> compat_resize_rel_table(torch.randn(7 * 7 + 3, 2), [4, 4], [5, 3]).shape
        torch.Size([48, 2])
    """
    old_h, old_w = 2 * old_window[0] - 1, 2 * old_window[1] - 1
    new_h, new_w = 2 * new_window[0] - 1, 2 * new_window[1] - 1
    if old_h == new_h and old_w == new_w:
        return table
    heads = table.shape[-1]
    sub = table[: old_h * old_w].reshape(1, old_w, old_h, heads).permute(0, 3, 1, 2)
    sub = F.interpolate(sub, size=[new_h, new_w], mode="bilinear", align_corners=False)
    sub = sub.permute(0, 2, 3, 1).reshape(new_h * new_w, heads)
    return torch.cat([sub, table[old_h * old_w :]], dim=0)
