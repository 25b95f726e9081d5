"""Unlabelled images for calibration (:func:`timm_anysize.calibrate`): read from a tensor, a folder or batches, and
rendered as a model sees them (its size, channels, normalisation and resize interpolation).

Example:
    >>> import torch
    >>> render = Render((32, 48), 1, (0.5,), (0.5,), "bilinear")
    >>> render(torch.rand(2, 3, 64, 64), default_channel_map).shape
    torch.Size([2, 1, 32, 48])
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_anysize.core.errors import CalibrationError
from timm_anysize.pretrained_cfg import stats_for_channels

__all__ = ["Render", "render_of", "default_channel_map", "as_images", "IMAGE_SUFFIXES", "ImagesArg", "ChannelMap"]

ImagesArg = Union[torch.Tensor, str, os.PathLike, Iterable[Any]]
ChannelMap = Callable[[torch.Tensor, int], torch.Tensor]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class Render:
    """How one model sees an image: its size, channels, normalisation and resize interpolation."""

    img_size: tuple[int, int]
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str

    def __call__(self, x: torch.Tensor, channel_map: ChannelMap) -> torch.Tensor:
        mode = self.interpolation if self.interpolation in ("nearest", "bilinear", "bicubic") else "bilinear"
        if tuple(x.shape[-2:]) != self.img_size:
            align = None if mode == "nearest" else False
            x = F.interpolate(x, size=self.img_size, mode=mode, align_corners=align, antialias=mode != "nearest")
        x = channel_map(x, self.in_chans)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous()


def default_channel_map(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """An image's channels as a model with ``in_chans`` expects them, by the rule the adapted stem assumes (and
    :func:`~timm_anysize.pretrained_cfg.stats_for_channels` for the mean and std): gray
    repeated to RGB, RGB averaged to gray, extra channels repeating the first ones (timm's ``adapt_input_conv``
    repeats the RGB kernel cyclically), fewer channels the first ones.

    Example:
        >>> default_channel_map(torch.ones(1, 1, 2, 2), 3).shape, default_channel_map(torch.rand(1, 3, 2, 2), 1).shape
        (torch.Size([1, 3, 2, 2]), torch.Size([1, 1, 2, 2]))
    """
    c = x.shape[1]
    if c == in_chans:
        return x
    if in_chans == 1:
        return x.mean(dim=1, keepdim=True)
    if c == 1:
        return x.expand(-1, in_chans, -1, -1)
    if in_chans > c:
        return x[:, [i % c for i in range(in_chans)]]
    return x[:, :in_chans]


def render_of(model: nn.Module, img_size: Optional[tuple[int, int]] = None) -> Render:
    cfg = timm.data.resolve_data_config(model=model)
    c, h, w = cfg["input_size"]
    return Render(
        img_size or (h, w),
        c,
        stats_for_channels(cfg["mean"], c),
        stats_for_channels(cfg["std"], c),
        cfg["interpolation"],
    )


def _folder_images(folder: Path, size: tuple[int, int]) -> torch.Tensor:
    """Every image file under ``folder`` (any nesting), read with timm's dataset and resized to ``size``, in [0, 1]."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise CalibrationError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it or below it")
    transform = timm.data.create_transform(
        input_size=(3, *size), interpolation="bicubic", crop_pct=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)
    )
    dataset = timm.data.ImageDataset(str(folder), transform=transform)
    out = []
    for i in range(len(dataset)):
        try:
            out.append(dataset[i][0])
        except Exception as e:  # PIL's UnidentifiedImageError, OSError for truncated files
            path = dataset.filename(i, absolute=True)
            raise CalibrationError(f"{path}: cannot be read as an image ({e}); remove or replace it") from e
    if not out:
        raise CalibrationError(f"{folder}: no image files in it or below it")
    return torch.stack(out)


def as_images(images: ImagesArg, size: tuple[int, int]) -> torch.Tensor:
    """The images as one float tensor ``[N, C, H, W]`` in [0, 1] (batches of other sizes resized to ``size``)."""
    if isinstance(images, (str, os.PathLike)):
        folder = Path(images)
        if not folder.is_dir():
            raise CalibrationError(
                f"{folder}: not a folder of images; pass a folder, a tensor or an iterable of batches"
            )
        return _folder_images(folder, size)
    if isinstance(images, torch.Tensor):
        batches: list[torch.Tensor] = [images]
    else:
        batches = []
        for batch in images:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(x, torch.Tensor):
                raise CalibrationError(
                    f"an image batch is a {type(x).__name__}; batches are float tensors [B, C, H, W]"
                )
            batches.append(x)
    for x in batches:
        if x.dim() != 4 or not x.is_floating_point():
            raise CalibrationError(
                f"images of shape {list(x.shape)} and dtype {x.dtype}: pass float tensors [N, C, H, W] in [0, 1]"
            )
    batches = [
        x if tuple(x.shape[-2:]) == tuple(batches[0].shape[-2:]) else F.interpolate(x, size=size, mode="bilinear")
        for x in batches
        if len(x)
    ]
    if not batches:
        raise CalibrationError("no images: pass at least one unlabelled image")
    if len({x.shape[1] for x in batches}) > 1:
        raise CalibrationError(f"batches with {sorted({x.shape[1] for x in batches})} channels: use one count")
    if len({tuple(x.shape[-2:]) for x in batches}) > 1:
        batches = [F.interpolate(x, size=size, mode="bilinear") for x in batches]
    return torch.cat(batches).float()
