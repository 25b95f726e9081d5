"""Shifted-window attention at any input size, for the Swin families (Swin, SwinV2, SwinV2-CR).

timm's Swin blocks roll the feature map, *then* pad it to a multiple of the window, and build the shift mask for
the padded size. When the padding is not a multiple of the window that mask is wrong: tokens wrapped around from
one edge share a region with tokens of the opposite edge and attend to them, and real tokens attend to the zero
padding. Here the map is padded first and then rolled (as the original Swin does), and the mask labels every
position by its region in the shifted frame *and* by whether it is padding, so real tokens attend exactly to the
real tokens of their own window region. Where no padding is needed the mask and the outputs are timm's own,
bit for bit. Masks depend only on sizes; they are cached per size in eager mode.

The shape-dependent steps (pad + roll + partition, the mask, reverse + roll back + crop) are functions that
TorchScript compiles and that FX records as one node each (timm's notrace registry and ``torch.fx.wrap``). While
compiling or exporting they take no shape branch: the map is always padded (by zero where nothing is missing) and
every block gets a mask tensor (all zeros where nothing is masked: adding it changes no score).
"""

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, register_notrace_function
from timm.models import FeatureListNet, swin_transformer, swin_transformer_v2, swin_transformer_v2_cr

from timm_anysize.core.family import REL_TABLE, DynamicPath, Family, TinyModel, gray_and_4ch
from timm_anysize.core.flexi_embed import FlexiPatchEmbedMixin
from timm_anysize.core.padding import pad_to_multiple
from timm_anysize.core.runtime_options import (
    RuntimeOptions,
    RuntimeOptionsMixin,
    runtime_options,
    set_runtime_options,
    swap_classes,
)
from timm_anysize.core.size_cache import size_lru_cache, traced

torch.fx.wrap("pad_to_multiple")  # a leaf of plain FX traces here too (fx.wrap patches this module's globals)

__all__ = [
    "FAMILIES",
    "shifted_window_mask",
    "window_mask",
    "window_partition_padded",
    "window_merge",
    "enable_swin_dynamic",
    "pads_at_own_size",
    "padding_card_note",
    "SWIN_BLOCKS",
]

MASK_VALUE = -100.0  # timm's value for masked pairs


def _bands(idx: torch.Tensor, n: int, window: int, shift: int) -> torch.Tensor:
    """timm's three bands along an axis of the rolled frame: before the last window (0), the last window's
    unwrapped part (1), the wrapped-around part (2); all 0 without a shift."""
    if shift == 0:
        return torch.zeros_like(idx)
    return (idx >= n - window).long() + (idx >= n - shift).long()


def _mask(
    h: int,
    w: int,
    hp: int,
    wp: int,
    window: List[int],
    shift: List[int],
    device: Optional[torch.device],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The additive mask ``[num_windows, area, area]`` from sizes alone (no shape branch)."""
    rows = torch.arange(hp, device=device)
    cols = torch.arange(wp, device=device)
    region = _bands(rows, hp, window[0], shift[0])[:, None] * 3 + _bands(cols, wp, window[1], shift[1])[None, :]
    # Padding sits at rows >= h / cols >= w before the roll; after rolling by -shift, position i holds i + shift.
    pad = (((rows + shift[0]) % hp) >= h)[:, None] | (((cols + shift[1]) % wp) >= w)[None, :]
    labels = torch.where(pad, torch.full_like(region, 9), region)
    windows = labels.reshape(hp // window[0], window[0], wp // window[1], window[1]).permute(0, 2, 1, 3)
    windows = windows.reshape(-1, window[0] * window[1])
    differ = windows.unsqueeze(1) != windows.unsqueeze(2)
    return torch.zeros(differ.shape, device=device, dtype=dtype).masked_fill(differ, -100.0)  # MASK_VALUE


def shifted_window_mask(
    size: List[int],
    padded: List[int],
    window: List[int],
    shift: List[int],
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> Optional[torch.Tensor]:
    """The additive attention mask ``[num_windows, area, area]`` of one block, or None when nothing is masked.

    Args:
        size: The feature map's real (H, W).
        padded: (H, W) padded up to a multiple of the window.
        window: Window size.
        shift: Cyclic shift (0, 0 for a block without shift).

    Example:
        >>> shifted_window_mask((8, 8), (8, 8), (4, 4), (0, 0)) is None
        True
        >>> shifted_window_mask((6, 8), (8, 8), (4, 4), (2, 2)).shape
        torch.Size([4, 16, 16])
    """
    if size[0] == padded[0] and size[1] == padded[1] and shift[0] == 0 and shift[1] == 0:
        return None
    return _mask(size[0], size[1], padded[0], padded[1], [window[0], window[1]], [shift[0], shift[1]], device, dtype)


@size_lru_cache(maxsize=64)
def _cached_mask(
    size: Tuple[int, int],
    padded: Tuple[int, int],
    window: Tuple[int, int],
    shift: Tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> Optional[torch.Tensor]:
    return shifted_window_mask(size, padded, window, shift, device, dtype)


@torch.fx.wrap
@register_notrace_function
def window_mask(x: torch.Tensor, window: List[int], shift: List[int]) -> torch.Tensor:
    """The mask of a block for its input ``x`` ``[B, H, W, C]``, always a tensor (zeros where nothing is masked):
    what FX, ``torch.compile`` and ``torch.export`` record, with no branch on the size.

    Example:
        >>> window_mask(torch.zeros(1, 8, 8, 2), [4, 4], [0, 0]).abs().sum().item()
        0.0
    """
    h, w = x.shape[1], x.shape[2]
    hp = h + (window[0] - h % window[0]) % window[0]
    wp = w + (window[1] - w % window[1]) % window[1]
    return _mask(h, w, hp, wp, window, shift, x.device, x.dtype)


@torch.fx.wrap
@register_notrace_function
def window_partition_padded(x: torch.Tensor, window: List[int], shift: List[int], always_pad: bool) -> torch.Tensor:
    """``[B, H, W, C]`` padded (bottom/right) to whole windows, rolled by ``-shift``, cut into windows
    ``[B * num_windows, area, C]`` in timm's window order.

    Example:
        >>> window_partition_padded(torch.zeros(2, 6, 8, 3), [4, 4], [2, 2], False).shape
        torch.Size([8, 16, 3])
    """
    B, H, W, C = x.shape
    pad_h = (window[0] - H % window[0]) % window[0]
    pad_w = (window[1] - W % window[1]) % window[1]
    if always_pad or pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    if shift[0] != 0 or shift[1] != 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.reshape(B, Hp // window[0], window[0], Wp // window[1], window[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], C)


@torch.fx.wrap
@register_notrace_function
def window_merge(
    windows: torch.Tensor, x: torch.Tensor, window: List[int], shift: List[int], always_crop: bool
) -> torch.Tensor:
    """Undo :func:`window_partition_padded` for attention outputs ``windows``: back to ``x``'s ``[B, H, W, C]``.

    Example:
        >>> x = torch.randn(2, 6, 8, 3)
        >>> torch.equal(window_merge(window_partition_padded(x, [4, 4], [2, 2], False), x, [4, 4], [2, 2], False), x)
        True
    """
    H, W = x.shape[1], x.shape[2]
    C = windows.shape[-1]
    pad_h = (window[0] - H % window[0]) % window[0]
    pad_w = (window[1] - W % window[1]) % window[1]
    Hp, Wp = H + pad_h, W + pad_w
    out = windows.reshape(-1, Hp // window[0], Wp // window[1], window[0], window[1], C)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(-1, Hp, Wp, C)
    if shift[0] != 0 or shift[1] != 0:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    if always_crop or pad_h > 0 or pad_w > 0:
        out = out[:, :H, :W, :].contiguous()
    return out


class _WindowAttention:
    """A Swin block's (shifted) window attention on ``[B, H, W, C]`` of any H, W: pad, roll, attend, undo."""

    def _window_attn(self, x: torch.Tensor) -> torch.Tensor:
        window = [self.window_size[0], self.window_size[1]]
        shift = [self.shift_size[0], self.shift_size[1]]
        if torch.jit.is_scripting():
            H, W = x.shape[1], x.shape[2]
            padded = [H + (window[0] - H % window[0]) % window[0], W + (window[1] - W % window[1]) % window[1]]
            mask = shifted_window_mask([H, W], padded, window, shift, x.device, x.dtype)
            branch_free = False
        else:
            branch_free = traced()
            mask = self._anysize_mask(x, window, shift, branch_free)
        windows = window_partition_padded(x, window, shift, branch_free)
        out = self.attn(windows, mask=mask)
        return window_merge(out, x, window, shift, branch_free)

    @torch.jit.unused
    def _anysize_mask(self, x: torch.Tensor, window: List[int], shift: List[int], branch_free: bool):
        """Eager: the cached mask (None where nothing is masked); FX, compiling, exporting: a mask tensor always."""
        if branch_free or isinstance(x, torch.fx.Proxy):
            return window_mask(x, window, shift)
        H, W = x.shape[1], x.shape[2]
        padded = (H + (-H) % window[0], W + (-W) % window[1])
        return _cached_mask((H, W), padded, tuple(window), tuple(shift), x.device, x.dtype)


class DynamicSwinBlock(_WindowAttention, swin_transformer.SwinTransformerBlock):
    """timm's Swin block with window attention at any size (see the module docstring)."""

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        return self._window_attn(x)


class DynamicSwinV2Block(_WindowAttention, swin_transformer_v2.SwinTransformerV2Block):
    """timm's SwinV2 block with window attention at any size."""

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        return self._window_attn(x)


class DynamicSwinV2CrBlock(_WindowAttention, swin_transformer_v2_cr.SwinTransformerV2CrBlock):
    """timm's SwinV2-CR block with window attention at any size."""

    def _shifted_window_attn(self, x: torch.Tensor) -> torch.Tensor:
        return self._window_attn(x)


class DynamicCrPatchEmbed(RuntimeOptionsMixin, swin_transformer_v2_cr.PatchEmbed):
    """SwinV2-CR's patch embedding, which cannot pad, padding its input (its run-time options' ``pad``) as timm's
    PatchEmbed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.anysize_options().pad:
            x = pad_to_multiple(x, [self.patch_size[0], self.patch_size[1]], not torch.jit.is_scripting() and traced())
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FlexiCrPatchEmbedMixin(FlexiPatchEmbedMixin):
    """SwinV2-CR's patch embedding at a run-time patch size (its row's ``flexi_mixin``): its norm runs over the
    channels of the NCHW map the projection gives, where timm's ``PatchEmbed`` flattens to tokens first."""

    def _anysize_layout(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # type: ignore[attr-defined]


SWIN_BLOCKS: dict = {
    swin_transformer.SwinTransformerBlock: DynamicSwinBlock,
    swin_transformer_v2.SwinTransformerV2Block: DynamicSwinV2Block,
    swin_transformer_v2_cr.SwinTransformerV2CrBlock: DynamicSwinV2CrBlock,
}
SWIN_MODELS = (
    swin_transformer.SwinTransformer,
    swin_transformer_v2.SwinTransformerV2,
    swin_transformer_v2_cr.SwinTransformerV2Cr,
)


def enable_swin_dynamic(model: nn.Module, pad: bool) -> None:
    """Make a Swin-family model run at any input size, in place: patch padding (``pad``) and correct masks."""
    for module in swap_classes(model, SWIN_BLOCKS):
        module.dynamic_mask = True
        module.attn_mask = None  # the fixed-size mask is never used again
    model.dynamic_img_size = True  # (on a feature wrapper of a Swin model, its flattened modules)
    pe = model.patch_embed
    pe.strict_img_size = False
    if isinstance(pe, PatchEmbed):
        pe.dynamic_img_pad = pad  # type: ignore[misc]  # timm marks it Final (for TorchScript); set before scripting
    elif isinstance(pe, swin_transformer_v2_cr.PatchEmbed):  # SwinV2-CR's own patch embedding cannot pad
        pe.__class__ = DynamicCrPatchEmbed
        options = runtime_options(model)
        set_runtime_options(pe, options if options is not None else RuntimeOptions(pad=pad))


def pads_at_own_size(model: nn.Module) -> bool:
    """Whether any block of a Swin-family model pads its feature map at the size the model was built for (there,
    timm's masks and these differ)."""
    for module in model.modules():
        if type(module) in SWIN_BLOCKS or type(module) in SWIN_BLOCKS.values():
            size = getattr(module, "input_resolution", None) or getattr(module, "feat_size", None)
            if size is not None and any(s % w for s, w in zip(size, module.window_size)):
                return True
    return False


def padding_card_note(model: nn.Module) -> str:
    """The model card's line for a Swin-family variant whose stages pad at its own size (:func:`pads_at_own_size`:
    plain timm's outputs there differ slightly), else "" (the rows' ``card_note``).

    Example:
        >>> import timm
        >>> padding_card_note(timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1)))
        ''
    """
    if not pads_at_own_size(model):
        return ""
    return (
        "At this size some Swin stages are padded to whole windows. timm-anysize masks the padding and the "
        "wrap-around of the shifted windows exactly; timm 1.0.31 rolls before padding, so plain timm's outputs "
        "here differ slightly from the ones this variant was evaluated with."
    )


def _claims(model: nn.Module) -> bool:
    """A Swin-family model, or a ``features_only`` wrapper holding Swin blocks (flattened into it by timm)."""
    if type(model) in SWIN_MODELS:
        return True
    return type(model) is FeatureListNet and any(type(m) in SWIN_BLOCKS for m in model.modules())


_RUNTIME = DynamicPath(enable=enable_swin_dynamic, claims=_claims)
_SWIN_DYNAMIC = ("dynamic_img_size",)

# Measured with torch 2.14 on CPU: tracing the padded, rolled windows with symbolic H and W does not finish in minutes.
_EXPORT_NOTE = (
    "torch.compile(dynamic=True) and torch.export with symbolic H x W spend minutes (unfinished) simplifying the "
    "padded, rolled window shapes (torch 2.14, CPU); torch.compile(dynamic=False) compiles one graph per size and "
    "equals eager (tested); TorchScript and FX run at any size"
)

# Whole windows at every stage with the windows the 64 px variant keeps (4, 4, 4, 2), or smaller than 32 px (timm shrinks
# them to the grids, where the variant's masked windows are equal): 72 and 96 px are not, and timm pads those grids
# with zero tokens that its windows attend to (its mask separates only the shifted regions), where ours masks them.
_TRAIN_SIZES = (16, 64, 128)

FAMILIES = (
    Family(
        name="swin",
        dynamic_features=True,
        classes=(swin_transformer.SwinTransformer,),
        tensors=REL_TABLE,
        dynamic="cached",
        dynamic_args=_SWIN_DYNAMIC,
        runtime=_RUNTIME,
        card_note=padding_card_note,
        export_note=_EXPORT_NOTE,
        example="swin_tiny_patch4_window7_224",
        tiny=TinyModel(
            dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4),
            step=8,
            feature_indices=(0, 1, 2),
            script_fx="windows",
            built_note="the test sizes pad the windows, where timm's own model built at that size gives other outputs",
            compile_static=_EXPORT_NOTE,
            conformance=gray_and_4ch((64, 96), 136),
            multiple=4,
            train_sizes=_TRAIN_SIZES,
        ),
    ),
    Family(
        name="swinv2",
        dynamic_features=True,
        classes=(swin_transformer_v2.SwinTransformerV2,),
        tensors=(),  # continuous position bias (an MLP over log coordinates): no table to resize
        dynamic="cached",
        dynamic_args=_SWIN_DYNAMIC,
        runtime=_RUNTIME,
        card_note=padding_card_note,
        export_note=_EXPORT_NOTE,
        example="swinv2_tiny_window8_256",
        tiny=TinyModel(
            dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4),
            step=8,
            feature_indices=(0, 1, 2),
            script_fx="windows",
            built_note="the test sizes pad the windows, where timm's own model built at that size gives other outputs",
            compile_static=_EXPORT_NOTE,
            conformance=gray_and_4ch((64, 96), 136),
            multiple=4,
            train_sizes=_TRAIN_SIZES,
            train_built=(64, 128),
            train_note="at 16 px timm shrinks each stage's window to its grid (4, 2, 1, 1), and SwinV2's continuous "
            "position bias scales its relative coordinates by the window size: the variant's masked 4 x 4 windows "
            "give other biases (3e-4 apart); Swin's table does not scale and is equal there",
        ),
    ),
    Family(
        name="swinv2_cr",
        flexi_mixin=FlexiCrPatchEmbedMixin,
        dynamic_features=True,
        classes=(swin_transformer_v2_cr.SwinTransformerV2Cr,),
        tensors=(),
        dynamic="cached",
        dynamic_args=_SWIN_DYNAMIC,
        runtime=_RUNTIME,
        card_note=padding_card_note,
        export_note=_EXPORT_NOTE,
        example="swinv2_cr_tiny_224",
        tiny=TinyModel(
            dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4),
            step=8,
            feature_indices=(0, 1, 2),
            script_fx="windows",
            built_note="the test sizes pad the windows, where timm's own model built at that size gives other outputs",
            compile_static=_EXPORT_NOTE,
            conformance=gray_and_4ch((64, 96), 136),
            multiple=4,
            train_sizes=_TRAIN_SIZES,
        ),
    ),
)
