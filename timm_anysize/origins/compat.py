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
- ``big_vision``: bilinear with antialias (``jax.image.resize``'s default; close to, not bit-identical with, JAX).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

__all__ = ["PosEmbedCompat", "COMPAT_PRESETS", "compat_preset", "compat_resample_pos_embed"]


@dataclass(frozen=True)
class PosEmbedCompat:
    """One library's way of resampling a position grid.

    Attributes:
        name: Preset name (``adapt.pos_embed.compat``).
        mode: ``F.interpolate`` mode.
        antialias: Anti-alias when downsampling.
        align_corners: ``F.interpolate``'s ``align_corners``.
        scale_offset: If set, interpolate with ``scale_factor=(new + offset) / old`` instead of ``size`` (DINO).
        where: The code reproduced, for reports and docs.
    """

    name: str
    mode: str
    antialias: bool
    align_corners: Optional[bool]
    scale_offset: Optional[float] = None
    where: str = ""

    def describe(self) -> str:
        """One line for reports, e.g. ``compat torchvision: bicubic, align_corners=True, antialias=False``."""
        how = f"scale_factor (n+{self.scale_offset})/M" if self.scale_offset is not None else "size"
        return (f"compat {self.name}: {self.mode}, align_corners={self.align_corners}, antialias={self.antialias}, "
                f"{how}")


COMPAT_PRESETS: dict[str, PosEmbedCompat] = {
    p.name: p
    for p in (
        PosEmbedCompat("timm", "bicubic", True, False, where="timm.layers.resample_abs_pos_embed"),
        PosEmbedCompat("torchvision", "bicubic", False, True,
                       where="torchvision.models.vision_transformer.interpolate_embeddings"),
        PosEmbedCompat("transformers", "bicubic", False, False,
                       where="transformers ViT/DeiT/Dinov2/Beit/Swin embeddings.interpolate_pos_encoding"),
        PosEmbedCompat("mmpretrain", "bicubic", False, False, where="mmpretrain.models.utils.resize_pos_embed"),
        PosEmbedCompat("dino", "bicubic", False, False, scale_offset=0.1,
                       where="facebookresearch/dino and dinov2 VisionTransformer.interpolate_pos_encoding"),
        PosEmbedCompat("big_vision", "bilinear", True, False, where="big_vision resample_posemb (jax.image.resize)"),
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
        raise ValueError(f"unknown position-embedding compat {name!r}; choose one of {', '.join(COMPAT_PRESETS)}") \
            from None


def compat_resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int],
    num_prefix_tokens: int,
    compat: str,
) -> torch.Tensor:
    """Resample ``[1, prefix + H*W, C]`` from ``old_grid`` to ``new_grid`` exactly as the library ``compat`` does.

    The prefix tokens (class, distillation, registers) pass through; the grid is interpolated in float32 and cast
    back, as transformers, MMPretrain and DINOv2 do.

    Example:
        >>> pe = torch.randn(1, 1 + 4 * 4, 8)
        >>> compat_resample_pos_embed(pe, (6, 3), (4, 4), 1, "dino").shape
        torch.Size([1, 19, 8])
    """
    preset = compat_preset(compat)
    new_grid, old_grid = (int(new_grid[0]), int(new_grid[1])), (int(old_grid[0]), int(old_grid[1]))
    if preset.name == "timm":
        return resample_abs_pos_embed(pos_embed, new_size=list(new_grid), old_size=list(old_grid),
                                      num_prefix_tokens=num_prefix_tokens, interpolation="bicubic", antialias=True)
    if new_grid == old_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    img = grid.reshape(1, *old_grid, dim).permute(0, 3, 1, 2).float()
    kwargs: dict = {"mode": preset.mode, "antialias": preset.antialias}
    if preset.mode in ("bicubic", "bilinear"):
        kwargs["align_corners"] = preset.align_corners
    if preset.scale_offset is not None:
        kwargs["scale_factor"] = tuple((n + preset.scale_offset) / o for n, o in zip(new_grid, old_grid))
    else:
        kwargs["size"] = new_grid
    out = F.interpolate(img, **kwargs)
    if tuple(out.shape[-2:]) != new_grid:  # DINO's offset guarantees the floor lands on the grid; guard anyway
        raise ValueError(f"compat {compat}: resampled grid {tuple(out.shape[-2:])} != requested {new_grid}")
    out = out.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, out], dim=1)
