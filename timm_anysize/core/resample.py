"""Resampling geometry-dependent tensors laid out on grids, as one function per layout.

Used both when weights are loaded at a new geometry (:mod:`timm_anysize.adapt`) and at run time by the dynamic
paths (:mod:`timm_anysize.core.cache`, :mod:`timm_anysize.families.levit`, :mod:`timm_anysize.families.mvitv2`), so a model
adapted to a size and a dynamic model run at that size compute the same tensors, bit for bit.
"""

from typing import List, Tuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function, resample_abs_pos_embed, resample_abs_pos_embed_nhwc

from timm_anysize.core.compat import compat_resample_pos_embed
from timm_anysize.core.size_cache import size_lru_cache

__all__ = [
    "resample_pos_tokens",
    "resample_grid",
    "resample_blocks",
    "resize_bias_grid",
    "resize_rel_axis",
    "resize_rel_pos_table",
]


# The one resampling of token position embeddings: a load (adapt.resample_pos_embed) and the dynamic paths
# (core.runtime_options) call this function, so a loaded variant and a dynamic model at its size cannot drift. TorchScript
# compiles it; FX records it as one node (timm's notrace registry for calls from a forward, torch.fx.wrap here and in
# core.runtime_options, whose helpers call it, as timm's resample_abs_pos_embed).
@torch.fx.wrap
@register_notrace_function
def resample_pos_tokens(
    pos_embed: torch.Tensor,
    grid: List[int],
    native: List[int],
    prefix: int,
    interpolation: str,
    antialias: bool,
    compat: str = "timm",
) -> torch.Tensor:
    """A token position embedding ``[1, prefix + H*W, C]`` resampled from the ``native`` grid to ``grid`` (timm's
    ``resample_abs_pos_embed``; the embedding itself at the native grid), or as the library ``compat`` does
    (``adapt.pos_embed.compat``, :mod:`timm_anysize.core.compat`; it fixes the interpolation). Prefix tokens
    (class, distillation, registers) are kept aside; the grid is interpolated in float32.

    Example:
        >>> resample_pos_tokens(torch.randn(1, 1 + 4 * 4, 8), [6, 2], [4, 4], 1, "bicubic", True).shape
        torch.Size([1, 13, 8])
    """
    if compat != "timm":
        return compat_resample_pos_embed(pos_embed, grid, native, prefix, compat)
    return resample_abs_pos_embed(
        pos_embed,
        new_size=grid,
        old_size=native,
        num_prefix_tokens=prefix,
        interpolation=interpolation,
        antialias=antialias,
    )


def resample_grid(
    grid: torch.Tensor, new_grid: List[int], interpolation: str, antialias: bool, channels_last: bool
) -> torch.Tensor:
    """Resample a position embedding laid out as an image, ``[1, C, H, W]`` (or ``[1, H, W, C]``), to ``new_grid``
    (TorchScript compiles it: the dynamic paths call it when scripted).

    Example:
        >>> resample_grid(torch.randn(1, 8, 4, 6), (8, 3), "bicubic", True, channels_last=False).shape
        torch.Size([1, 8, 8, 3])
    """
    nhwc = grid if channels_last else grid.permute(0, 2, 3, 1)
    out = resample_abs_pos_embed_nhwc(
        nhwc, new_size=[new_grid[0], new_grid[1]], interpolation=interpolation, antialias=antialias
    )
    return out if channels_last else out.permute(0, 3, 1, 2).contiguous()


def resample_blocks(blocks: torch.Tensor, new_grid: List[int], interpolation: str, antialias: bool) -> torch.Tensor:
    """Resample a position embedding laid out in blocks (NesT), ``[1, T, N, C]``: ``T`` blocks (``g x g``) of
    ``N`` positions each (a square block), to the grid ``new_grid`` cut into the same ``g x g`` blocks (each
    ``new_grid / g``). The blocks are put together into one image, resampled, and cut again -- timm's
    ``nest.resize_pos_embed`` (there with no antialias and square grids only). TorchScript compiles it.

    Example:
        >>> resample_blocks(torch.randn(1, 4, 3 * 3, 8), [10, 8], "bicubic", True).shape
        torch.Size([1, 4, 20, 8])
    """
    _, t, n, c = blocks.shape
    g, b = int(round(t**0.5)), int(round(n**0.5))
    image = blocks.reshape(1, g, g, b, b, c).transpose(2, 3).reshape(1, g * b, g * b, c)
    image = resample_grid(image, new_grid, interpolation, antialias, channels_last=True)
    bh, bw = new_grid[0] // g, new_grid[1] // g
    return image.reshape(1, g, bh, g, bw, c).transpose(2, 3).reshape(1, t, bh * bw, c)


def resize_bias_grid(
    biases: torch.Tensor, old_grid: List[int], new_grid: List[int], interpolation: str
) -> torch.Tensor:
    """Resize attention biases indexed by ``|dy|, |dx|`` offsets (LeViT, EfficientFormer), ``[heads, H*W]``, between
    two grids (``(h, w)`` sequences). Scriptable: the dynamic LeViT path calls it at run time.

    Example:
        >>> resize_bias_grid(torch.randn(4, 7 * 7), (7, 7), (8, 6), "bicubic").shape
        torch.Size([4, 48])
    """
    heads = biases.shape[0]
    if biases.device.type == "meta":  # shapes only (plan checks, the input-size probe): torch's meta bicubic without
        return biases.new_empty([heads, new_grid[0] * new_grid[1]])  # antialias is a Python decomposition, 0.1 s a call
    grid = biases.reshape(1, heads, old_grid[0], old_grid[1]).float()
    out = F.interpolate(grid, size=[new_grid[0], new_grid[1]], mode=interpolation, align_corners=False)
    return out.reshape(heads, -1).to(biases.dtype)


def resize_rel_axis(table: torch.Tensor, length: int) -> torch.Tensor:
    """Resize a one-axis relative-position table ``[2n - 1, C]`` to ``length`` entries (linear, as MViTv2 does).

    Example:
        >>> resize_rel_axis(torch.randn(13, 8), 27).shape
        torch.Size([27, 8])
    """
    if table.shape[0] == length:
        return table
    out = F.interpolate(table.float().t()[None], size=length, mode="linear", align_corners=False)
    return out[0].t().to(table.dtype).contiguous()


def _offsets(src: int, dst: int) -> List[float]:
    """The geometric source offsets of timm's ``resize_rel_pos_bias_table`` (the same float arithmetic)."""
    left, right = 1.01, 1.5
    q = (left + right) / 2.0
    while right - left > 1e-6:
        q = (left + right) / 2.0
        gp = 1.0 * (1.0 - q ** (src // 2)) / (1.0 - q)
        if gp > dst // 2:
            right = q
        else:
            left = q
    dis: List[float] = []
    cur = 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    out: List[float] = []
    for i in range(len(dis) - 1, -1, -1):
        out.append(-dis[i])
    out.append(0.0)
    return out + dis


def _interp_weights(
    points: List[torch.Tensor], targets: List[torch.Tensor]
) -> Tuple[List[List[torch.Tensor]], List[List[torch.Tensor]], List[torch.Tensor]]:
    """The corners, distances and spans of timm's ``RegularGridInterpolator`` for two axes (the same operations)."""
    idxs: List[List[torch.Tensor]] = []
    dists: List[List[torch.Tensor]] = []
    overalls: List[torch.Tensor] = []
    for p, x in zip(points, targets):
        idx_right = torch.bucketize(x, p)
        idx_right[idx_right >= p.shape[0]] = p.shape[0] - 1
        idx_left = (idx_right - 1).clamp(0, p.shape[0] - 1)
        dist_left = x - p[idx_left]
        dist_right = p[idx_right] - x
        dist_left[dist_left < 0] = 0.0
        dist_right[dist_right < 0] = 0.0
        both_zero = (dist_left == 0) & (dist_right == 0)
        dist_left[both_zero] = 1.0
        dist_right[both_zero] = 1.0
        idxs.append([idx_left, idx_right])
        dists.append([dist_left, dist_right])
        overalls.append(dist_left + dist_right)
    return idxs, dists, overalls


def _interp2d(points: List[torch.Tensor], values: torch.Tensor, targets: List[torch.Tensor]) -> torch.Tensor:
    """timm's ``RegularGridInterpolator`` for two axes (the same operations in the same order)."""
    idxs, dists, overalls = _interp_weights(points, targets)
    numerator = torch.zeros_like(targets[0])
    for a in range(2):
        for b in range(2):
            weight = torch.prod(torch.stack([dists[0][1 - a], dists[1][1 - b]]), dim=0)
            numerator = numerator + values[idxs[0][a], idxs[1][b]] * weight
    return numerator / torch.prod(torch.stack(overalls), dim=0)


def _rel_table_points(src: List[int], dst: List[int]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The source offsets of a ``src`` table and the target offsets of a ``dst`` one (timm's, per axis)."""
    yx = [torch.tensor(_offsets(src[0], dst[0])), torch.tensor(_offsets(src[1], dst[1]))]
    ty, tx = dst[0] // 2.0, dst[1] // 2.0
    dyx = torch.meshgrid([torch.arange(-ty, ty + 0.1, 1.0), torch.arange(-tx, tx + 0.1, 1.0)], indexing="ij")
    return yx, [dyx[0], dyx[1]]


@size_lru_cache(maxsize=64)
def _rel_table_plan(
    src: Tuple[int, int], dst: Tuple[int, int], device: torch.device
) -> Tuple[List[torch.Tensor], List[torch.Tensor], torch.Tensor]:
    """What :func:`_interp2d` computes from the sizes alone, on ``device``: each corner's flat source index and weight
    (``[N]`` and ``[N, 1]``, ``N`` the target cells), and the denominator ``[N, 1]``."""
    points, targets = _rel_table_points([src[0], src[1]], [dst[0], dst[1]])
    idxs, dists, overalls = _interp_weights(points, targets)
    index: List[torch.Tensor] = []
    weight: List[torch.Tensor] = []
    for a in range(2):
        for b in range(2):
            weight.append(torch.prod(torch.stack([dists[0][1 - a], dists[1][1 - b]]), dim=0).reshape(-1, 1))
            index.append((idxs[0][a] * src[1] + idxs[1][b]).reshape(-1))
    denominator = torch.prod(torch.stack(overalls), dim=0).reshape(-1, 1)
    return [i.to(device) for i in index], [w.to(device) for w in weight], denominator.to(device)


@torch.jit.unused
def _resize_all_heads(table: torch.Tensor, src: List[int], dst: List[int], flat: bool) -> torch.Tensor:
    """:func:`_interp2d` for every head at once, on the table's device, from the sizes' cached plan: the same
    products, sums and division per value, in the same order, so the same values (timm resizes head by head on the
    CPU, and works out the plan on every call)."""
    index, weight, denominator = _rel_table_plan((src[0], src[1]), (dst[0], dst[1]), table.device)
    values = table.float() if flat else table.float().flatten(1).t()  # [cells, heads]
    numerator = torch.zeros_like(weight[0])
    for corner in range(4):
        numerator = numerator + values[index[corner]] * weight[corner]
    out = numerator / denominator
    return (out if flat else out.t().reshape(-1, dst[0], dst[1])).to(table.dtype)


def resize_rel_pos_table(
    table: torch.Tensor, old_window: List[int], new_window: List[int], flat: bool = True
) -> torch.Tensor:
    """timm's ``resize_rel_pos_bias_table`` (scipy off, no extra tokens), scriptable, bit for bit.

    Resizes a relative-position bias table between two attention windows: ``flat`` ``[(2h-1)*(2w-1), heads]``
    (Swin/BEiT/MaxViT layout) or, with ``flat=False``, ``[heads, 2h-1, 2w-1]`` (the TF MaxViT layout). Used at
    run time by the dynamic BEiT, MaxViT and GCViT paths, which TorchScript compiles, so it is a port of timm's
    function rather than a call to it. Outside TorchScript every head is resized at once on the table's device, from
    indices and weights cached per pair of sizes (a training step at another size resizes each table inline).

    Example:
        >>> resize_rel_pos_table(torch.randn(13 * 13, 4), [7, 7], [8, 6]).shape
        torch.Size([165, 4])
    """
    src = [2 * old_window[0] - 1, 2 * old_window[1] - 1]
    dst = [2 * new_window[0] - 1, 2 * new_window[1] - 1]
    if src[0] == dst[0] and src[1] == dst[1]:
        return table
    if not torch.jit.is_scripting():
        return _resize_all_heads(table, src, dst, flat)
    yx, dyx = _rel_table_points(src, dst)
    heads: List[torch.Tensor] = []
    for i in range(table.shape[1] if flat else table.shape[0]):
        z = table[:, i].view(src[0], src[1]).float().cpu() if flat else table[i].float().cpu()
        r = _interp2d(yx, z, dyx).contiguous().to(table.device)
        heads.append(r.view(-1, 1) if flat else r)
    out = torch.cat(heads, dim=-1) if flat else torch.stack(heads, dim=0)
    return out.to(table.dtype)
