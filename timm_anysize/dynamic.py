"""Run-time dynamic input size: any H x W in one model instance, with the resampled position embedding cached.

timm's ``dynamic_img_size=True`` re-interpolates the position embedding on every forward. Here the resampled
embedding is computed once per grid and reused while the weights are unchanged; the cache is invalidated by any
change of the weights (``load_state_dict``, an optimizer step, ``.to()``), because its stamp is the position
embedding's storage, version counter, dtype and device. When a gradient can flow to the position embedding
(training), or while compiling, tracing or exporting, the resampling runs inline and stays differentiable and
traceable.

The only timm behaviour replaced is where ``_pos_embed`` gets the embedding from; the token layout it builds is
timm's own (pinned by a test against timm's dynamic path).
"""


from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Format, PatchEmbed, nchw_to
from timm.layers.helpers import is_exporting
from timm.models import (
    FeatureListNet,
    beit,
    cait,
    crossvit,
    deit,
    eva,
    hiera,
    levit,
    mvitv2,
    pit,
    vision_transformer,
    volo,
)

from timm.models._features import feature_take_indices  # timm exports it from no public module

from .cache import (
    DEFAULT_CACHE_SIZE,
    DynamicOptions,
    PosEmbedCache,
    dynamic_pos_embed,
    patch_grid,
    resample_pos_tokens,
    symbolic,
    traced,
)
from .dynamic_beit import DynamicBeit, enable_beit_dynamic
from .dynamic_conv_stems import DynamicCrossVit, DynamicPit, DynamicVolo
from .dynamic_hiera import DynamicHiera, enable_hiera_dynamic
from .dynamic_levit import DynamicLevit, DynamicLevitDistilled, enable_levit_dynamic
from .dynamic_mvit import enable_mvit_dynamic
from .swin_windows import SWIN_BLOCKS, SWIN_MODELS, enable_swin_dynamic

__all__ = [
    "enable_dynamic",
    "is_dynamic",
    "clear_dynamic_cache",
    "dynamic_cache_info",
    "PosEmbedCache",
    "DynamicOptions",
    "DEFAULT_CACHE_SIZE",
]

def _add_pos_embed(x: torch.Tensor, pos_embed: torch.Tensor, prefix: List[torch.Tensor], no_embed_class: bool):
    """timm's token layout: add then concat prefix tokens (no_embed_class), or concat then add."""
    if no_embed_class:
        x = x + pos_embed
        return torch.cat(prefix + [x], dim=1) if len(prefix) > 0 else x
    if len(prefix) > 0:
        x = torch.cat(prefix + [x], dim=1)
    return x + pos_embed


# TorchScript compiles the branches under ``torch.jit.is_scripting()``: the same resampling (function and options)
# as the eager path, without its cache. Eager code (the cache, ``super()``) sits behind ``not is_scripting()``.


class DynamicVisionTransformer(vision_transformer.VisionTransformer):
    """timm's VisionTransformer with a cached dynamic position embedding (set by :func:`enable_dynamic`)."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and (self.pos_embed is None or not self.dynamic_img_size):
            return super()._pos_embed(x)
        B, H, W, C = x.shape
        prefix: List[torch.Tensor] = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(B, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(B, -1, -1))
        if torch.jit.is_scripting():
            grid = self.patch_embed.grid_size
            pos_embed = resample_pos_tokens(
                self.pos_embed, [H, W], [grid[0], grid[1]], 0 if self.no_embed_class else self.num_prefix_tokens,
                self._anysize_interpolation, self._anysize_antialias,
            )
        else:
            pos_embed = dynamic_pos_embed(self, (H, W))
        x = _add_pos_embed(x.view(B, -1, C), pos_embed, prefix, self.no_embed_class)
        return self.pos_drop(x)


class DynamicVisionTransformerDistilled(deit.VisionTransformerDistilled):
    """timm's distilled DeiT with a cached dynamic position embedding."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not self.dynamic_img_size:
            return super()._pos_embed(x)
        B, H, W, C = x.shape
        prefix = [self.cls_token.expand(B, -1, -1), self.dist_token.expand(B, -1, -1)]
        if torch.jit.is_scripting():
            grid = self.patch_embed.grid_size
            pos_embed = resample_pos_tokens(
                self.pos_embed, [H, W], [grid[0], grid[1]], 0 if self.no_embed_class else self.num_prefix_tokens,
                self._anysize_interpolation, self._anysize_antialias,
            )
        else:
            pos_embed = dynamic_pos_embed(self, (H, W))
        x = _add_pos_embed(x.view(B, -1, C), pos_embed, prefix, self.no_embed_class)
        return self.pos_drop(x)


class DynamicEva(eva.Eva):
    """timm's EVA with a cached dynamic absolute position embedding (RoPE is generated for the grid by timm)."""

    def _pos_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not torch.jit.is_scripting() and (
            self.pos_embed is None or not self.dynamic_img_size or self.patch_drop is not None
        ):
            return super()._pos_embed(x)
        B, H, W, C = x.shape
        rot_pos_embed = self.rope.get_embed(shape=[H, W]) if self.rope is not None else None
        prefix: List[torch.Tensor] = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(B, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(B, -1, -1))
        if torch.jit.is_scripting():
            grid = self.patch_embed.grid_size
            pos_embed = resample_pos_tokens(
                self.pos_embed, [H, W], [grid[0], grid[1]], 0 if self.no_embed_class else self.num_prefix_tokens,
                self._anysize_interpolation, self._anysize_antialias,
            )
        else:
            pos_embed = dynamic_pos_embed(self, (H, W))
        x = _add_pos_embed(x.view(B, -1, C), pos_embed, prefix, self.no_embed_class)
        return self.pos_drop(x), rot_pos_embed


class DynamicCait(cait.Cait):
    """timm's CaiT with a cached dynamic position embedding (patch tokens only: the class token joins later)."""

    def _anysize_pos(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens plus the position embedding of the input's grid (``x``: the image)."""
        ps = self.patch_embed.patch_size
        grid = patch_grid(x, [ps[0], ps[1]], self.patch_embed.dynamic_img_pad)
        x = self.patch_embed(x)  # tokens, as timm lays them out
        if torch.jit.is_scripting():
            native = self.patch_embed.grid_size
            pos_embed = resample_pos_tokens(self.pos_embed, grid, [native[0], native[1]], 0,
                                            self._anysize_interpolation, self._anysize_antialias)
        else:
            pos_embed = dynamic_pos_embed(self, grid, prefix=0)
        return self.pos_drop(x + pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not self.dynamic_img_size:
            return super().forward_features(x)
        x = self.blocks(self._anysize_pos(x))
        if self.blocks_token_only is not None:
            x = self.forward_cls(x)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ``forward_intermediates`` with the position embedding of the input's grid (any size)."""
        assert output_fmt in ("NCHW", "NLC"), "Output format must be one of NCHW or NLC."
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        ps = self.patch_embed.patch_size
        H, W = patch_grid(x, [ps[0], ps[1]], self.patch_embed.dynamic_img_pad)
        x = self._anysize_pos(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        for i, blk in enumerate(blocks):
            x = blk(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        if output_fmt == "NCHW":
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if intermediates_only:
            return intermediates
        if self.blocks_token_only is not None:
            x = self.forward_cls(x)
        return self.norm(x), intermediates


class DynamicPatchEmbed(PatchEmbed):
    """timm's PatchEmbed (padding on: ``dynamic_img_pad``) that skips ``F.pad`` when there is nothing to pad.

    timm pads unconditionally with ``dynamic_img_pad``, and a zero-size pad still copies the whole input
    (about 0.5% of a ViT-Ti forward at batch 32). While scripting, tracing, compiling or exporting, it pads as timm
    does so the graph stays free of shape branches (TorchScript has no ``super()``: timm's steps are spelled out).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_img_pad and (torch.jit.is_scripting() or self._must_pad(x)):
            pad_h = (self.patch_size[0] - x.shape[-2] % self.patch_size[0]) % self.patch_size[0]
            pad_w = (self.patch_size[1] - x.shape[-1] % self.patch_size[1]) % self.patch_size[1]
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # NCHW -> NLC
        elif self.output_fmt != Format.NCHW:
            x = nchw_to(x, self.output_fmt)
        return self.norm(x)

    @torch.jit.unused
    def _must_pad(self, x: torch.Tensor) -> bool:
        """Eager: whether the input is not whole patches; traced: always (no shape branch)."""
        if symbolic(x) or traced():
            return True
        return bool(x.shape[-2] % self.patch_size[0] or x.shape[-1] % self.patch_size[1])


_DYNAMIC_CLASSES: dict[type, type] = {
    vision_transformer.VisionTransformer: DynamicVisionTransformer,
    deit.VisionTransformerDistilled: DynamicVisionTransformerDistilled,
    eva.Eva: DynamicEva,
    beit.Beit: DynamicBeit,
    cait.Cait: DynamicCait,
    pit.PoolingVisionTransformer: DynamicPit,
    volo.VOLO: DynamicVolo,
    crossvit.CrossVit: DynamicCrossVit,
    hiera.Hiera: DynamicHiera,
    levit.Levit: DynamicLevit,
    levit.LevitDistilled: DynamicLevitDistilled,
    mvitv2.MultiScaleVit: mvitv2.MultiScaleVit,  # the model class stays; its attentions change
}
# Module classes swapped inside the model, per dynamic class (the bias tables / resolutions of its attention).
_MODULE_SETUP: dict[type, Callable[[nn.Module, int], None]] = {
    DynamicBeit: enable_beit_dynamic,
    DynamicHiera: enable_hiera_dynamic,
    DynamicLevit: enable_levit_dynamic,
    DynamicLevitDistilled: enable_levit_dynamic,
    mvitv2.MultiScaleVit: enable_mvit_dynamic,
}
# Stems that take any input size: no patch-embedding set-up (Hiera pads to whole mask units itself).
_CONV_STEMS = (
    DynamicPit, DynamicVolo, DynamicCrossVit, DynamicHiera, DynamicLevit, DynamicLevitDistilled, mvitv2.MultiScaleVit
)
# Patch embeddings kept in timm's token layout (their paths read the grid off the input size).
_TOKEN_LAYOUT = (DynamicBeit, DynamicCait)


class InputNotDivisibleError(ValueError):
    """An input size is not a multiple of the patch and padding is off."""


def _check_divisible(module: nn.Module, args: tuple) -> None:
    h, w = args[0].shape[-2:]
    ph, pw = module.patch_size
    if not (torch.compiler.is_compiling() or is_exporting()) and (h % ph or w % pw):
        raise InputNotDivisibleError(
            f"input {h}x{w} is not a multiple of the patch {ph}x{pw} and padding is off; resize or crop to a "
            f"multiple of the patch, or turn padding on (pad: true in the variant's YAML, enable_dynamic(pad=True))"
        )


def is_dynamic(model: nn.Module) -> bool:
    """True if ``model`` runs at any input size through :func:`enable_dynamic`."""
    if getattr(model, "_anysize_native_dynamic", False):  # a family that runs at any size through timm's own path
        return True
    dynamic_type = type(model) in _DYNAMIC_CLASSES.values() or isinstance(model, SWIN_MODELS)
    has_options = getattr(model, "_anysize_dynamic", None) is not None
    return dynamic_type and has_options and bool(getattr(model, "dynamic_img_size", False))


def enable_dynamic(
    model: nn.Module,
    pad: bool = True,
    interpolation: str = "bicubic",
    antialias: bool = True,
    cache_size: int = DEFAULT_CACHE_SIZE,
) -> nn.Module:
    """Make a timm model accept any input H x W, in place, with what each size needs computed once and cached.

    Works on any supported timm model, whether or not it was built by timm-anysize: ViT (incl. registers and
    ``no_embed_class``), distilled DeiT, EVA, CaiT, PiT, VOLO, CrossViT and Hiera (position embedding resampled per
    grid), BEiT (bias tables per grid, :mod:`timm_anysize.dynamic_beit`), LeViT (biases per stage resolution,
    :mod:`timm_anysize.dynamic_levit`), MViTv2 (relative-position axes per feature size,
    :mod:`timm_anysize.dynamic_mvit`), and Swin, SwinV2, SwinV2-CR (exact masks over padded windows,
    :mod:`timm_anysize.swin_windows`; also a Swin ``features_only`` wrapper). At the model's own size the outputs are
    bit-identical to before; at other sizes they equal a model built for that size with the same resampling
    (Swin: where no padding is needed).

    Args:
        model: The model; changed in place (its class becomes a subclass with the cached path).
        pad: Pad inputs that are not a multiple of the patch (bottom/right, as timm's ``dynamic_img_pad``); when
            False such inputs raise a ``ValueError`` that says how to fix it.
        interpolation: Resampling mode of the position embedding (``set_input_size`` uses bicubic).
        antialias: Anti-alias when the grid shrinks.
        cache_size: Grids kept in the LRU cache.

    Returns:
        The same model.

    Raises:
        TypeError: The model's class is not supported.

    Example:
        >>> import timm, torch
        >>> m = enable_dynamic(timm.create_model("test_vit").eval())
        >>> m(torch.randn(1, 3, 96, 130)).shape
        torch.Size([1, 1000])
    """
    cls = type(model)
    for handle in getattr(model, "_anysize_pad_hooks", ()):
        handle.remove()
    model._anysize_pad_hooks = []
    if cls in SWIN_MODELS or (cls is FeatureListNet and any(type(m) in SWIN_BLOCKS for m in model.modules())):
        enable_swin_dynamic(model, pad)
        if not pad:
            model._anysize_pad_hooks.append(model.patch_embed.register_forward_pre_hook(_check_divisible))
        model._anysize_dynamic = DynamicOptions(interpolation, antialias, pad)
        return model
    dynamic_cls = _DYNAMIC_CLASSES.get(cls) or (cls if cls in _DYNAMIC_CLASSES.values() else None)
    if dynamic_cls is None:
        names = ", ".join(c.__name__ for c in (*_DYNAMIC_CLASSES, *SWIN_MODELS))
        raise TypeError(f"enable_dynamic: {cls.__name__} is not supported (supported: {names})")
    rope = getattr(model, "rope", None)
    if rope is not None and getattr(rope, "feat_shape", None) is not None:
        raise TypeError(
            f"enable_dynamic: this {cls.__name__} was built with RoPE for a fixed {tuple(rope.feat_shape)} grid; "
            f"create it with timm.create_model(..., dynamic_img_size=True), then call enable_dynamic"
        )
    model.__class__ = dynamic_cls
    model.dynamic_img_size = True
    model._anysize_dynamic = DynamicOptions(interpolation, antialias, pad)
    model._anysize_interpolation, model._anysize_antialias = interpolation, antialias  # for TorchScript
    model._anysize_pos_cache = PosEmbedCache(cache_size)
    model._anysize_caches = {}
    if dynamic_cls in _MODULE_SETUP:
        _MODULE_SETUP[dynamic_cls](model, cache_size)
    if dynamic_cls in _CONV_STEMS:
        return model
    pe = model.patch_embed
    pe.strict_img_size = False
    if dynamic_cls not in _TOKEN_LAYOUT:
        pe.flatten = False
        pe.output_fmt = Format.NHWC
    pe.dynamic_img_pad = pad
    if type(pe) is PatchEmbed:
        pe.__class__ = DynamicPatchEmbed
    if not pad:
        model._anysize_pad_hooks.append(pe.register_forward_pre_hook(_check_divisible))
    return model


def _cache(model: nn.Module) -> Optional[PosEmbedCache]:
    return getattr(model, "_anysize_pos_cache", None)


def clear_dynamic_cache(model: nn.Module) -> None:
    """Drop the cached position embeddings and bias tables (needed only after writing weights through ``.data``)."""
    for module in model.modules():
        for cache in (getattr(module, "_anysize_pos_cache", None), getattr(module, "_anysize_bias_cache", None),
                      *getattr(module, "_anysize_caches", {}).values()):
            if cache is not None:
                cache.clear()


def dynamic_cache_info(model: nn.Module) -> dict[str, int]:
    """Hits, misses, invalidations and size of the model's position-embedding cache.

    Example:
        >>> import timm, torch
        >>> m = enable_dynamic(timm.create_model("test_vit").eval())
        >>> with torch.no_grad():
        ...     _ = m(torch.randn(1, 3, 64, 64)); _ = m(torch.randn(1, 3, 64, 64))
        >>> dynamic_cache_info(m)["hits"]
        1
    """
    cache = _cache(model)
    if cache is None:
        raise ValueError(f"{type(model).__name__} is not dynamic; call enable_dynamic(model) first")
    return cache.info()
