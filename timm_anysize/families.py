"""The table of supported model families: what in each family depends on geometry, and how timm normalises its
checkpoints. Adding a family is one row here plus one row of tests (tests/test_families.py).

A row names the geometry-dependent tensors by key pattern and kind; the windows and grids they are laid out on are
read off models built at the source and the target geometry (on the meta device), never guessed from a size.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import torch.nn as nn
from timm.layers import HybridEmbed
from timm.models import (
    beit,
    cait,
    crossvit,
    deit,
    eva,
    hiera,
    levit,
    mvitv2,
    naflexvit,
    pit,
    swin_transformer,
    swin_transformer_v2,
    swin_transformer_v2_cr,
    twins,
    vision_transformer,
    volo,
    xcit,
)

from .spec import Size2

__all__ = [
    "Family",
    "FAMILIES",
    "family_of",
    "GEOMETRY_CHANGES",
    "UNSUPPORTED",
    "classify_changes",
    "families_markdown",
    "tensor_layouts",
]

CheckpointFilter = Callable[[dict, nn.Module], dict]

# Kinds of geometry-dependent tensors (see adapt.py for how each is resampled):
#   pos_tokens  absolute position embedding [1, prefix + H*W, C] on the family's patch grid
#   pos_nchw    absolute position embedding [1, C, H, W]
#   pos_nhwc    absolute position embedding [1, H, W, C]
#   rel_table   relative-position bias table [(2Wh-1)(2Ww-1) (+3), heads]; window: the owning module's window_size
#   bias_grid   attention biases over |dy|, |dx| offsets [heads, H*W]; grid: the owning module's resolution
#   rel_axis    one axis's relative-position table [2n - 1, C] (MViTv2); length: the tensor's own in each model
TENSOR_KINDS = ("pos_tokens", "pos_nchw", "pos_nhwc", "rel_table", "bias_grid", "rel_axis")

_NO_CONV_PATCH = "the stem is a stack of strided convolutions with no single patch kernel to resize"
_OVERLAPPING_STEM = "{name}'s stem kernel (7x7, stride 4) overlaps; there is no patch kernel to resize"


def _no_patch_change(reason: str) -> dict[str, str]:
    """The unsupported cells of a family whose patch size cannot change, both directions with one reason."""
    return {"patch_smaller": reason, "patch_larger": reason}


@dataclass(frozen=True)
class Family:
    """Geometry-dependent parts of one family of timm models.

    Attributes:
        name: Short family name used in messages and reports.
        classes: Model classes of the family (exact types, or dynamic subclasses of them).
        checkpoint_filter: timm's own filter that normalises foreign checkpoint layouts (applied with a model at the
            *source* geometry, so it renames and reshapes but never resamples).
        tensors: ``(key pattern, kind)`` of the geometry-dependent tensors (kinds: ``TENSOR_KINDS``).
        pos_embed_prefix: Entries of a token position embedding that belong to prefix tokens, when the model's
            attributes do not say it (CaiT's class token joins after the patch stage: 0); None: derive it.
        patch_embeds: Attribute path(s) of the patch embedding(s) whose ``grid_size`` lays out the token position
            embedding(s), in the order of the ``pos_tokens`` patterns.
        linear_patch: The patch projection is an ``nn.Linear`` over flattened ``(ph, pw, C)`` patches (NaFlexViT).
        first_conv: The first layer the input meets, where the base's pretrained cfg may name another (a ViT base
            built with ``use_naflex=True`` is a NaFlexViT); None: the cfg's ``first_conv``.
        dynamic: How the family runs at any input size: ``cached`` (timm-anysize's path,
            :func:`timm_anysize.enable_dynamic`: what each size needs is computed once and cached), ``native``
            (timm's own constructor arguments ``dynamic_args``, or none needed), or ``""`` (cannot;
            ``dynamic_reason`` says why).
        dynamic_args: timm constructor arguments that switch on the family's own dynamic size (``native``).
        dynamic_features: A ``features_only`` model of the family runs at any size too (its feature path goes
            through the dynamic code); False: feature models take the variant's own size.
        square_only: timm's constructor takes square sizes only; a non-square variant is built square with its
            width tables refitted (:mod:`timm_anysize.square_build`), and cannot be exported for plain timm.
        unsupported: Geometry change -> why the architecture cannot take it; such specs are rejected at validation.
        size_multiples: For architectures whose branches or stages need whole multiples at the model's own size:
            ``(model built at any size, img_size) -> ((what, size, multiple), ...)``, the sizes an ``img_size`` gives
            and what each must be a multiple of. Validation rejects a variant whose size breaks one, naming the
            nearest sizes that work.
        example: A timm model of the family, used by the coverage matrix and docs/families.md.
        matches: Extra test on the instance (e.g. a ViT whose stem is a hybrid CNN).
    """

    name: str
    classes: tuple[type, ...]
    checkpoint_filter: Optional[CheckpointFilter] = None
    tensors: tuple[tuple[str, str], ...] = (("pos_embed", "pos_tokens"),)
    pos_embed_prefix: Optional[int] = None
    patch_embeds: tuple[str, ...] = ("patch_embed",)
    linear_patch: bool = False
    first_conv: Optional[str] = None
    dynamic: str = "cached"
    dynamic_args: tuple[str, ...] = ("dynamic_img_size", "dynamic_img_pad")
    dynamic_reason: str = ""
    dynamic_features: bool = False
    square_only: bool = False
    unsupported: dict[str, str] = field(default_factory=dict)
    size_multiples: Optional[Callable[[nn.Module, Size2], tuple[tuple[str, Size2, Size2], ...]]] = None
    example: str = ""
    matches: Optional[Callable[[nn.Module], bool]] = None

    @property
    def supports_dynamic(self) -> bool:
        """Whether a variant of the family can run at any input size."""
        return bool(self.dynamic)

    @property
    def timm_dynamic(self) -> bool:
        """Whether plain timm builds the family to run at any size (what an export gives timm without the plugin)."""
        return self.dynamic == "native" or "dynamic_img_size" in self.dynamic_args

    @property
    def changes_patch(self) -> bool:
        """Whether the family's patch size can be changed (one patch kernel to resize)."""
        return "patch_smaller" not in self.unsupported

    def patch_embed(self, model: nn.Module) -> Optional[nn.Module]:
        """The (first) patch embedding module, or None."""
        return model.get_submodule(self.patch_embeds[0]) if self.patch_embeds else None

    def grid_size(self, model: nn.Module) -> Optional[Size2]:
        """The patch grid (H, W) the model was built for, where the family has one."""
        pe = self.patch_embed(model)
        grid = getattr(pe, "grid_size", None)
        return tuple(int(g) for g in grid) if grid is not None else None  # type: ignore[return-value]

    def patch_size(self, model: nn.Module) -> Optional[Size2]:
        """The patch size (H, W) of the model's patch embedding, where the family has one to change."""
        if not self.changes_patch:
            return None
        size = getattr(self.patch_embed(model), "patch_size", None)
        if size is None:
            return None
        if isinstance(size, int):
            return (size, size)
        return (int(size[0]), int(size[1]))

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """Tokens before the patch tokens (class, distillation, registers)."""
        default = 1 if getattr(model, "cls_token", None) is not None else 0
        return int(getattr(model, "num_prefix_tokens", default))

    def pos_embed_prefix_tokens(self, model: nn.Module) -> int:
        """How many leading entries of a token position embedding belong to prefix tokens (kept aside on resample)."""
        if self.pos_embed_prefix is not None:
            return self.pos_embed_prefix
        if getattr(model, "no_embed_class", False):
            return 0
        return self.num_prefix_tokens(model)

    def token_grid(self, model: nn.Module, index: int) -> Size2:
        """The patch grid of the ``index``-th token position embedding."""
        pe = model.get_submodule(self.patch_embeds[min(index, len(self.patch_embeds) - 1)])
        grid = getattr(pe, "grid_size", None)
        if grid is None and hasattr(model, "tokens_spatial_shape"):  # Hiera: tokens on the stem's output grid
            grid = model.tokens_spatial_shape
        if grid is None:  # CrossViT's own PatchEmbed keeps only its sizes
            grid = [i // p for i, p in zip(pe.img_size, pe.patch_size)]
        return tuple(int(g) for g in grid)  # type: ignore[return-value]

    def dynamic_kwargs(self, dynamic: bool, pad: bool) -> dict[str, bool]:
        """timm constructor arguments for a dynamic/pad choice (said explicitly either way: some timm archs default
        to dynamic, and EVA builds its RoPE for it)."""
        values = {"dynamic_img_size": dynamic, "dynamic_img_pad": dynamic and pad}
        return {k: values[k] for k in self.dynamic_args} if self.dynamic else {}


def _is_hybrid(model: nn.Module) -> bool:
    return isinstance(getattr(model, "patch_embed", None), HybridEmbed)


def _crossvit_branch_sizes(model: nn.Module, img_size: Size2) -> tuple[tuple[str, Size2, Size2], ...]:
    """Each CrossViT branch embeds the input resized by its scale (``int(size * scale)``, as timm computes it) in
    whole patches of its own size; the scales are read off the built model."""
    out = []
    for i, pe in enumerate(model.patch_embed):
        scale = [s / b for s, b in zip(model.img_size_scaled[i], model.img_size)]
        size = tuple(int(x * r) for x, r in zip(img_size, scale))
        out.append((f"branch {i} (input x {scale[0]:.4g}, patch {pe.patch_size[0]})", size, tuple(pe.patch_size)))
    return tuple(out)  # type: ignore[return-value]


_REL_TABLE = (("*relative_position_bias_table", "rel_table"),)
_SWIN_DYNAMIC = ("dynamic_img_size",)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="vit",
        dynamic_features=True,
        classes=(vision_transformer.VisionTransformer,),
        # adapt_layer_scale maps original DeiT-3 'gamma_N' keys; no timm-format key contains 'gamma_'.
        checkpoint_filter=partial(vision_transformer.checkpoint_filter_fn, adapt_layer_scale=True),
        example="test_vit",
        matches=lambda m: not _is_hybrid(m),
    ),
    Family(
        name="vit_hybrid",
        dynamic_features=True,
        classes=(vision_transformer.VisionTransformer,),
        checkpoint_filter=vision_transformer.checkpoint_filter_fn,
        unsupported=_no_patch_change(
            "the patch is the stride of a CNN stem (ViTamin, ResNet hybrids), not a kernel to resize"
        ),
        example="vitamin_small_224",
        matches=_is_hybrid,
    ),
    Family(
        name="deit_distilled",
        dynamic_features=True,
        classes=(deit.VisionTransformerDistilled,),
        checkpoint_filter=vision_transformer.checkpoint_filter_fn,
        example="deit_tiny_distilled_patch16_224",
    ),
    Family(
        name="eva",
        dynamic_features=True,
        classes=(eva.Eva,),
        checkpoint_filter=eva.checkpoint_filter_fn,
        example="eva02_tiny_patch14_224",
    ),
    Family(
        name="beit",
        dynamic_features=True,
        classes=(beit.Beit,),
        checkpoint_filter=beit.checkpoint_filter_fn,
        tensors=_REL_TABLE,
        dynamic_args=(),  # timm's BEiT has no dynamic-size arguments; enable_dynamic adds the path
        example="beit_base_patch16_224",
    ),
    Family(
        name="cait",
        classes=(cait.Cait,),
        checkpoint_filter=cait.checkpoint_filter_fn,
        pos_embed_prefix=0,
        dynamic_args=(),  # timm's CaiT has no dynamic-size path; enable_dynamic adds it
        example="cait_xxs24_224",
    ),
    Family(
        name="swin",
        dynamic_features=True,
        classes=(swin_transformer.SwinTransformer,),
        tensors=_REL_TABLE,
        dynamic="cached",
        dynamic_args=_SWIN_DYNAMIC,
        example="swin_tiny_patch4_window7_224",
    ),
    Family(
        name="swinv2",
        dynamic_features=True,
        classes=(swin_transformer_v2.SwinTransformerV2,),
        tensors=(),  # continuous position bias (an MLP over log coordinates): no table to resize
        dynamic="cached",
        dynamic_args=_SWIN_DYNAMIC,
        example="swinv2_tiny_window8_256",
    ),
    Family(
        name="swinv2_cr",
        dynamic_features=True,
        classes=(swin_transformer_v2_cr.SwinTransformerV2Cr,),
        tensors=(),
        dynamic="cached",
        dynamic_args=_SWIN_DYNAMIC,
        example="swinv2_cr_tiny_224",
    ),
    Family(
        name="pit",
        classes=(pit.PoolingVisionTransformer,),
        tensors=(("pos_embed", "pos_nchw"),),
        unsupported=_no_patch_change(
            "PiT's patch kernel overlaps (stride = patch / 2); resizing it changes what a token sees"
        ),
        dynamic_args=(),  # conv stems take any size; enable_dynamic resamples the position embedding
        example="pit_ti_224",
    ),
    Family(
        name="volo",
        classes=(volo.VOLO,),
        tensors=(("pos_embed", "pos_nhwc"),),
        unsupported=_no_patch_change(_NO_CONV_PATCH),
        dynamic_args=(),  # conv stems take any size; enable_dynamic resamples the position embedding
        example="volo_d1_224",
    ),
    Family(
        name="levit",
        classes=(levit.Levit, levit.LevitDistilled),
        tensors=(("*attention_biases", "bias_grid"),),
        patch_embeds=(),
        unsupported=_no_patch_change(_NO_CONV_PATCH),
        dynamic_args=(),  # enable_dynamic gives each stage the resolution of the input
        example="levit_128s",
    ),
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
    Family(
        name="xcit",
        dynamic_features=True,
        classes=(xcit.Xcit,),
        tensors=(),  # Fourier position encoding, computed for the grid at run time
        unsupported=_no_patch_change(_NO_CONV_PATCH),
        dynamic="native",
        dynamic_args=(),
        example="xcit_nano_12_p16_224",
    ),
    Family(
        name="hiera",
        classes=(hiera.Hiera,),
        pos_embed_prefix=0,
        unsupported=_no_patch_change(_OVERLAPPING_STEM.format(name="Hiera")),
        dynamic_args=(),  # enable_dynamic rebuilds the token unroll per size
        example="hiera_tiny_224",
    ),
    Family(
        name="mvitv2",
        dynamic_features=True,
        classes=(mvitv2.MultiScaleVit,),
        tensors=(("*.rel_pos_h", "rel_axis"), ("*.rel_pos_w", "rel_axis")),
        unsupported=_no_patch_change(_OVERLAPPING_STEM.format(name="MViTv2")),
        square_only=True,  # timm asserts a square size; non-square variants get per-axis tables
        dynamic_args=(),  # enable_dynamic resizes the tables per feature size
        example="mvitv2_tiny",
    ),
    Family(
        name="crossvit",
        dynamic_features=True,
        classes=(crossvit.CrossVit,),
        tensors=(("pos_embed_0", "pos_tokens"), ("pos_embed_1", "pos_tokens")),
        pos_embed_prefix=1,  # each branch has its own class token (cls_token_0/1)
        patch_embeds=("patch_embed.0", "patch_embed.1"),
        unsupported=_no_patch_change(
            "CrossViT has one patch size per branch, which a single patch_size cannot express"
        ),
        dynamic_args=(),  # enable_dynamic sizes each branch from the input
        size_multiples=_crossvit_branch_sizes,
        example="crossvit_tiny_240",
    ),
    Family(
        name="naflexvit",
        dynamic_features=True,
        classes=(naflexvit.NaFlexVit,),
        tensors=(("embeds.pos_embed", "pos_nhwc"),),
        patch_embeds=("embeds",),
        linear_patch=True,
        first_conv="embeds.proj",
        dynamic="native",
        dynamic_args=("dynamic_img_pad",),  # NaFlexViT runs at any size; padding is its own option
        example="naflexvit_base_patch16_gap",
    ),
)


def family_of(model: nn.Module) -> Optional[Family]:
    """The family row for a model instance (or a dynamic subclass of one), or None if not supported."""
    for fam in FAMILIES:
        if any(type(model) is c or type(model).__bases__ == (c,) for c in fam.classes):
            if fam.matches is None or fam.matches(model):
                return fam
    return None


def tensor_layouts(family: Family, keys) -> dict[str, str]:
    """The geometry-dependent keys among ``keys`` and their kinds."""
    out = {}
    for key in keys:
        for pattern, kind in family.tensors:
            if fnmatch.fnmatchcase(key, pattern):
                out[key] = kind
                break
    return out


# The geometry changes the coverage matrix tests for every family (tests/test_families.py).
GEOMETRY_CHANGES: dict[str, str] = {
    "img_larger": "larger square image (position grid resampled)",
    "img_non_square": "non-square image",
    "patch_smaller": "smaller patch (kernel PI-resized, grid grows)",
    "patch_larger": "larger patch (kernel PI-resized, grid shrinks)",
    "in_chans_1": "1 input channel",
    "in_chans_4": "4 input channels",
}

# (family, change) -> why the architecture cannot take it. Checked when a spec is validated, before any weights are
# read (or built at the target geometry).
UNSUPPORTED: dict[tuple[str, str], str] = {
    (fam.name, change): reason for fam in FAMILIES for change, reason in fam.unsupported.items()
}


def classify_changes(source, target) -> list[str]:
    """The GEOMETRY_CHANGES a source -> target geometry makes (``source``/``target`` are plan Geometries)."""
    out = []
    if target.img_size != source.img_size:
        out.append("img_non_square" if target.img_size[0] != target.img_size[1] else "img_larger")
    if target.patch_size is not None and target.patch_size != source.patch_size:
        smaller = source.patch_size is not None and target.patch_size[0] < source.patch_size[0]
        out.append("patch_smaller" if smaller else "patch_larger")
    if target.in_chans != source.in_chans:
        out.append("in_chans_1" if target.in_chans == 1 else "in_chans_4")
    return out


def families_markdown() -> str:
    """docs/families.md: the coverage matrix, rendered from this table (a test keeps the file in sync)."""
    changes = list(GEOMETRY_CHANGES)
    lines = [
        "# Family coverage",
        "",
        "<!-- generated by `timm-anysize families`; do not edit by hand -->",
        "",
        "Each cell is tested by `tests/test_families.py` on the family's example model (shrunk to a few layers of",
        "width 32-64): every tensor is accounted for, copied tensors equal the checkpoint's and no other tensor is",
        "left at its fresh init; outputs are finite and of the right shape at the variant's size and, as every",
        "family runs at any size, at two other sizes (one non-square). Per family, the same geometry is bit-identical to the base,",
        "a 1-channel variant on a gray image equals the base on that image as RGB, and the export reloads in plain",
        "timm with the same outputs. A cell marked with a reason is rejected when the spec is validated, before any",
        "weights are read. `features_only` models carry the same adapted weights; they run at any size where the",
        "family's feature path goes through the dynamic code.",
        "",
        "| family | timm classes | example | " + " | ".join(changes) + " | any size at run time | features_only |",
        "|---|---|---|" + "---|" * len(changes) + "---|---|",
    ]
    for fam in FAMILIES:
        cells = [UNSUPPORTED.get((fam.name, c), "yes") for c in changes]
        dyn = {"cached": "yes (cached)", "native": "yes (timm's own)"}.get(fam.dynamic, f"no: {fam.dynamic_reason}")
        classes = ", ".join(c.__name__ for c in fam.classes)
        feats = "any size" if fam.dynamic_features else "the variant's size"
        lines.append(f"| {fam.name} | {classes} | `{fam.example}` | " + " | ".join(cells) + f" | {dyn} | {feats} |")
    lines += ["", "Changes: " + "; ".join(f"`{k}`: {v}" for k, v in GEOMETRY_CHANGES.items()) + ".", ""]
    return "\n".join(lines) + "\n"
