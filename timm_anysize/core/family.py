"""What a family of timm models is to timm-anysize: the :class:`Family` row (its geometry-dependent tensors, the
changes it cannot take, how it runs at any size) and the geometry changes rows are described in.

Each family's row lives with its run-time code in its own module of :mod:`timm_anysize.families`; this module is the
shared vocabulary they use and never needs editing to add a family.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch.nn as nn

from timm_anysize.core.attributes import size_attr
from timm_anysize.core.runtime_options import RuntimeOptions
from timm_anysize.core.spec import Size2

__all__ = [
    "Family",
    "DynamicPath",
    "TinyModel",
    "gray_and_4ch",
    "TENSOR_KINDS",
    "GEOMETRY_CHANGES",
    "NO_CONV_PATCH",
    "REL_TABLE",
    "OVERLAPPING_STEM",
    "no_patch_change",
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
#   pos_blocks  absolute position embedding in g x g square blocks [1, T, N, C] (NesT); grid: sqrt(T * N) a side
TENSOR_KINDS = ("pos_tokens", "pos_nchw", "pos_nhwc", "rel_table", "bias_grid", "rel_axis", "pos_blocks")

# The pattern of a relative-position bias table (BEiT, Swin).
REL_TABLE = (("*relative_position_bias_table", "rel_table"),)
NO_CONV_PATCH = "the stem is a stack of strided convolutions with no single patch kernel to resize"
OVERLAPPING_STEM = "{name}'s stem kernel (7x7, stride 4) overlaps; there is no patch kernel to resize"


def no_patch_change(reason: str) -> dict[str, str]:
    """The unsupported cells of a family whose patch size cannot change, both directions with one reason."""
    return {"patch_smaller": reason, "patch_larger": reason}


@dataclass(frozen=True)
class DynamicPath:
    """How :func:`timm_anysize.enable_dynamic` makes a timm model of a family run at any input size.

    Attributes:
        classes: timm model class -> the family's dynamic subclass (the same class where only inner modules change).
        setup: Swaps the family's inner modules for dynamic ones (bias tables, resolutions); ``(model, options)``: the
            run-time options :func:`timm_anysize.enable_dynamic` has just set on the model.
        patch_layout: What the patch embedding gives the dynamic path: ``"nhwc"`` (an NHWC grid: the grid is read off
            its shape), ``"tokens"`` (timm's token layout, kept), or ``"none"`` (a stem that takes any size as its
            convolutions do: nothing to set up).
        enable: A family's own enabler, ``(model, pad)``, for models it ``claims`` (Swin: its blocks, also inside a
            ``features_only`` wrapper); replaces the class swap.
        claims: Which models ``enable`` takes.
    """

    classes: dict[type, type] = field(default_factory=dict)
    setup: Optional[Callable[[nn.Module, RuntimeOptions], None]] = None
    patch_layout: str = "nhwc"
    enable: Optional[Callable[[nn.Module, bool], None]] = None
    claims: Optional[Callable[[nn.Module], bool]] = None


@dataclass(frozen=True)
class TinyModel:
    """The tiny model of a family's ``example`` that the test suite checks the family at.

    The family coverage matrix (tests/test_families.py), the TorchScript / FX / export modules
    (tests/test_script_fx_*.py) and timm's own ``tests/test_models.py`` on the conformance variants
    (tests/test_timm_conformance.py) all read it from the family's row: a new family's row is its test row too.

    Attributes:
        model_args: timm constructor arguments that shrink ``example`` to a few layers of width 16-64.
        img_size: The (square) size its test checkpoint is built at.
        step: By how much test sizes grow: a patch, or what the architecture's strides and windows need.
        export_scale: The export test's size, in ``img_size`` units (1: plain timm runs at ``img_size`` only).
        img_size_arg: timm's constructor takes ``img_size`` (False: a CNN that runs at any size takes none).
        feature_indices: The ``out_indices`` of its ``features_only`` checks (as many levels as ``model_args``
            leaves).
        script_fx: The tests/test_script_fx_<script_fx>.py module that checks it under TorchScript, FX,
            ``forward_intermediates``, compile and export: ``"tokens"`` (the default: position-embedding families),
            ``"windows"`` (window and stage families) or ``"fsam"`` (SAM, TNT, ConViT); "" only with
            ``script_fx_note``. Each module runs every check on every row of its group; the fields below opt a row
            out of one check, each with its reason.
        script_fx_note: Why no script/FX module checks the family (``script_fx=""``): its own test module does, or
            its forward is timm's own (checked by timm's tests on its conformance variants).
        other_sizes: The two sizes the script/FX module checks it at besides the variant's own, where the step rule
            (two larger non-square sizes, the last not whole patches) does not fit; (): that rule.
        script_error: What TorchScript raises on timm's own model of the family, which cannot be scripted (the
            module checks it raises that); "": it scripts, and the scripted models equal eager.
        fx_features_note: Why timm's FX feature extractor (``features_only=True, feature_cls="fx"``) cannot build a
            feature model of the family, plain timm's included ("": it can; each feature is checked equal to the
            eager model's module output).
        built_note: Why the dynamic model at another size is not compared with a timm model built at that size (its
            outputs, ``forward_intermediates`` and ``features_only``), "": it is, bit for bit. A row whose
            ``static_unsupported`` refuses non-square sizes is compared at a square size.
        compile_static: Why ``torch.compile(dynamic=True)`` cannot capture the dynamic model with a symbolic size;
            the compile check then uses ``dynamic=False`` (one graph per size). "": symbolic, one graph.
        compile_sizes: The sizes the compile check runs at instead of the module's three, asserting one graph
            (where a guard at those recompiles at each).
        compile_skip: Why the suite does not run the compile check (it compiles, too slowly for CI's budget); "": it
            does.
        export_error: What ``torch.export`` with a dynamic height and width raises on the dynamic model where the
            family's ``export_note`` says it stops with an error (checked); "": not checked (it exports, or takes too
            long to fail).
        timm_runs_off_multiple: Why timm's own model runs a size that breaks the family's ``size_multiples`` instead
            of failing (TNT: its unfold drops the pixels past the last whole patch); "": its forward fails there
            (checked).
        min_input: The smallest square input (px) the tiny model runs at with ``pad: true``, as
            :func:`timm_anysize.input_limits` finds it (its stem and stride chain); tests/test_runtime_sizes.py checks
            it and docs/families.md shows it.
        multiple: What each input side of the tiny model must be a multiple of with ``pad: false`` (its patch,
            windows, space-to-depth block; 1: any size); checked and shown the same way.
        conformance: The variants timm's own ``tests/test_models.py`` runs on: spec fields besides ``base``
            (``model_args`` defaults to the tiny model's; a deeper one where timm's feature tests want three
            levels), usually :func:`gray_and_4ch`. Each is registered as
            ``cf_<family>_[patch<p>_]<size>_<gray|<n>ch>``.
        base: A smaller timm entrypoint of the example's class that the tests build instead of ``example``
            (timm's own tests on the conformance variants, the many-sizes training, calibration, TorchScript / FX /
            compile / export), where ``example``'s own fixes full widths and depths (registered by
            tests/anysize_tiny_models.py); "": ``example`` with ``model_args``.
        train_sizes: The square sizes that test trains at; (): from the smallest run-time size to twice ``img_size``.
        train_built: The trained sizes it compares with a timm model built for each; None: all of them.
        train_note: Why the other trained sizes are not compared (with ``train_built``).

    Example:
        >>> tiny = TinyModel(dict(depth=2), conformance=gray_and_4ch((96, 160), 144, patch_size=12))
        >>> tiny.img_size, tiny.step, [c["in_chans"] for c in tiny.conformance]
        (64, 16, [1, 4])
    """

    model_args: dict[str, Any] = field(default_factory=dict)
    img_size: int = 64
    step: int = 16
    export_scale: int = 2
    img_size_arg: bool = True
    feature_indices: tuple[int, ...] = (0, 1)
    script_fx: str = "tokens"
    script_fx_note: str = ""
    other_sizes: tuple[Size2, ...] = ()
    script_error: str = ""
    fx_features_note: str = ""
    built_note: str = ""
    compile_static: str = ""
    compile_sizes: tuple[Size2, ...] = ()
    compile_skip: str = ""
    export_error: str = ""
    timm_runs_off_multiple: str = ""
    min_input: int = 1
    multiple: int = 1
    conformance: tuple[dict[str, Any], ...] = ()
    base: str = ""
    train_sizes: tuple[int, ...] = ()
    train_built: Optional[tuple[int, ...]] = None
    train_note: str = ""


def gray_and_4ch(gray: int | Size2, four: int, patch_size: Optional[int] = None, **spec: Any) -> tuple[dict, dict]:
    """The usual pair of conformance variants of a family: one channel at ``gray`` (non-square where the family
    takes it), and four channels at ``four`` with ``patch_size`` where the family changes its patch (timm's tests
    clamp its size to sizes that are not a multiple of the patch or stride). ``spec``: more fields for both (a
    ``model_args`` of their own, a ``pretrained`` source size).

    Example:
        >>> gray_and_4ch((96, 160), 144, patch_size=12)
        ({'img_size': [96, 160], 'in_chans': 1}, {'img_size': 144, 'in_chans': 4, 'patch_size': 12})
    """
    size = list(gray) if isinstance(gray, (tuple, list)) else gray
    patch = {} if patch_size is None else {"patch_size": patch_size}
    return dict(img_size=size, in_chans=1, **spec), dict(img_size=four, in_chans=4, **patch, **spec)


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
        linear_patch: The patch projection is an ``nn.Linear`` over flattened patches, in the order ``"hwc"``
            (``(ph, pw, C)``: NaFlexViT) or ``"chw"`` (``(C, ph, pw)``: Gemma 4's ViT); "": a convolution.
        space_to_depth: The first convolution sees the image through a space-to-depth of this block size (TResNet):
            its input channel ``(i * b + j) * C + c`` is channel ``c`` at offset ``(i, j)`` of each block; 0: none.
        first_conv: The first layer the input meets, where the base's pretrained cfg may name another (a ViT base
            built with ``use_naflex=True`` is a NaFlexViT); None: the cfg's ``first_conv``.
        dynamic: How the family runs at any input size: ``cached`` (timm-anysize's path,
            :func:`timm_anysize.enable_dynamic`: what each size needs is computed once and cached), ``native``
            (timm's own constructor arguments ``dynamic_args``, or none needed), or ``""`` (cannot;
            ``dynamic_reason`` says why).
        dynamic_args: timm constructor arguments that switch on the family's own dynamic size (``native``).
        whole_patches: The run-time forward (timm's own) takes only input sizes its stem divides: whole patches
            (Gemma 4's ViT) or space-to-depth blocks (TResNet); it neither pads nor crops the others. A non-multiple
            input raises :class:`~timm_anysize.core.errors.InputNotDivisibleError` before any layer runs, or is
            padded where ``stem_pad``.
        stem_pad: With ``pad: true`` (the default), an input that is not whole blocks of a ``whole_patches`` stem is
            zero-padded bottom/right to a multiple (as the patch families pad to whole patches) instead of refused.
        unpadded_multiple: With ``pad: false``, what each side of a run-time input must be a multiple of where the
            family's own forward would otherwise fail deep inside (Visformer's stage patch embeddings assert whole
            patches), ``(model) -> (mh, mw)``; checked before any layer runs. None: the family's patch embedding
            checks its own input (or it takes any size).
        dynamic_features: A ``features_only`` model of the family runs at any size too (its feature path goes
            through the dynamic code); False: feature models take the variant's own size.
        square_only: timm's constructor takes square sizes only; a non-square variant is built square with its
            width tables refitted (:func:`timm_anysize.families.mvitv2.create_square_only`), and cannot be exported
            for plain timm.
        build: How a model of the family is built at a target geometry timm's constructor does not take as it is,
            ``(create, kwargs) -> model`` where ``create(**kwargs)`` is timm's constructor (MViTv2: a non-square size
            is built square and its width tables refitted); None: ``create(**kwargs)``.
        unsupported: Geometry change -> why the architecture cannot take it; such specs are rejected at validation.
        static_unsupported: Geometry change -> why timm's own model cannot run it, so that only the dynamic path
            does; a variant with ``dynamic: false`` and such a change is rejected at validation.
        static_multiple: ``(model) -> multiple``: timm's own (fixed-size) model runs only at img_sizes that are
            multiples of it, for a reason its forward on the meta device cannot show (MViTv2: each stage's tables
            are sized for the floor of the size over its stride, its strided convolutions give the ceiling, and the
            meta device does not check the index that then overflows); a ``dynamic: false`` variant at another size
            is rejected at validation with the nearest multiples. None: no such constraint.
        export_note: Why the family's dynamic model cannot go through ``torch.export`` with dynamic H x W
            ("": it can; the tests/test_script_fx_*.py modules check it at three sizes).
        onnx_note: Why its ``torch.export`` program, which runs, cannot go on to ONNX (onnxruntime) with dynamic
            H x W ("": it can, checked the same way).
        runtime: How :func:`timm_anysize.enable_dynamic` sets the family up (``dynamic="cached"``).
        flexi_embed: Makes the family's patch embedding flexi (a run-time patch size, :mod:`timm_anysize.flexi`),
            in place, and returns it: a family whose embedding is not a patch convolution (NaFlexViT's linear
            projection) gives its own subclass of :class:`timm_anysize.core.flexi_embed.FlexiEmbed`; None: the
            generic path (the model made dynamic, its patch convolution's kernel PI-resized per call).
        flexi_mixin: On the generic path, the family's subclass of
            :class:`timm_anysize.core.flexi_embed.FlexiPatchEmbedMixin`, for a layout after the projection other
            than timm's ``PatchEmbed`` (SwinV2-CR: the norm over the channels of an NCHW map); None: the mixin itself.
        card_note: A line for the model card of a variant of the family (what plain timm does differently at its
            size), ``(model) -> str``, "" for none; None: no note.
        size_multiples: For architectures whose branches or stages need whole multiples at the model's own size:
            ``(model built at any size, img_size) -> ((what, size, multiple), ...)``, the sizes an ``img_size`` gives
            and what each must be a multiple of. Validation rejects a variant whose size breaks one, naming the
            nearest sizes that work.
        attention_maps: How many attention maps of one image its attention holds at once, for the memory estimate
            (``timm_anysize.core.memory.estimate_cost``), where the attention module does not show it (a mask passed at
            call time, extra position scores); None: 1 for timm's fused attention, 4 where the scores are
            materialised.
        token_bytes: ``(model) -> bytes``: what the family's forward holds per token of one image besides the
            attention maps, where that is large enough to matter for the memory estimate (Gemma 4's position
            one-hot: 2 x 10,240 entries per token); None: nothing counted.
        example: A timm model of the family, used by the coverage matrix and docs/families.md.
        tiny: The tiny model of ``example`` the test suite checks the family at (tests/test_families.py fails for a
            row without one); None: not a tested row (:func:`timm_anysize.families.generic_family`).
        matches: Extra test on the instance (e.g. a ViT whose stem is a hybrid CNN).
        generic: A family with no row of its own (:func:`timm_anysize.families.generic_family`): every tensor is
            copied unchanged except the first layer(s) and the classifier, and any other tensor whose shape depends
            on the geometry is refused by name when the plan is made.
    """

    name: str
    classes: tuple[type, ...]
    checkpoint_filter: Optional[CheckpointFilter] = None
    tensors: tuple[tuple[str, str], ...] = (("pos_embed", "pos_tokens"),)
    pos_embed_prefix: Optional[int] = None
    patch_embeds: tuple[str, ...] = ("patch_embed",)
    linear_patch: str = ""
    space_to_depth: int = 0
    first_conv: Optional[str] = None
    dynamic: str = "cached"
    dynamic_args: tuple[str, ...] = ("dynamic_img_size", "dynamic_img_pad")
    dynamic_reason: str = ""
    whole_patches: bool = False
    stem_pad: bool = False
    unpadded_multiple: Optional[Callable[[nn.Module], Size2]] = None
    dynamic_features: bool = False
    square_only: bool = False
    build: Optional[Callable[[Callable[..., nn.Module], dict[str, Any]], nn.Module]] = None
    unsupported: dict[str, str] = field(default_factory=dict)
    static_unsupported: dict[str, str] = field(default_factory=dict)
    static_multiple: Optional[Callable[[nn.Module], int]] = None
    export_note: str = ""
    onnx_note: str = ""
    runtime: Optional[DynamicPath] = None
    flexi_embed: Optional[Callable[[nn.Module], nn.Module]] = None
    flexi_mixin: Optional[type] = None
    card_note: Optional[Callable[[nn.Module], str]] = None
    size_multiples: Optional[Callable[[nn.Module, Size2], tuple[tuple[str, Size2, Size2], ...]]] = None
    attention_maps: Optional[int] = None
    token_bytes: Optional[Callable[[nn.Module], int]] = None
    example: str = ""
    tiny: Optional[TinyModel] = None
    matches: Optional[Callable[[nn.Module], bool]] = None
    generic: bool = False

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

    def create(self, create: Callable[..., nn.Module], kwargs: dict[str, Any]) -> nn.Module:
        """Build a model of the family with timm's constructor ``create`` and ``kwargs`` (through ``build``)."""
        return self.build(create, kwargs) if self.build is not None else create(**kwargs)

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

    def stem_multiple(self, model: nn.Module, pad: bool = True) -> Size2:
        """What each side of a run-time input must be a multiple of, checked before any layer runs: a
        ``whole_patches`` stem's block (the space-to-depth block, or the patch), or with padding off the family's
        ``unpadded_multiple``; (1, 1) for the others, whose patch embedding pads (or, with padding off, refuses with
        the same error) where their own forward needs it.

        Example:
            >>> from timm.models import tresnet
            >>> Family("t", (tresnet.TResNet,), space_to_depth=4, whole_patches=True).stem_multiple(None)
            (4, 4)
        """
        if self.whole_patches:
            if self.space_to_depth:
                return (self.space_to_depth, self.space_to_depth)
            return self.patch_size(model) or (1, 1)
        if not pad and self.unpadded_multiple is not None:
            return self.unpadded_multiple(model)
        return (1, 1)

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
            grid = [i // p for i, p in zip(size_attr(pe, "img_size"), size_attr(pe, "patch_size"))]
        return tuple(int(g) for g in grid)  # type: ignore[return-value]

    def dynamic_kwargs(self, dynamic: bool, pad: bool) -> dict[str, bool]:
        """timm constructor arguments for a dynamic/pad choice (said explicitly either way: some timm archs default
        to dynamic, and EVA builds its RoPE for it)."""
        values = {"dynamic_img_size": dynamic, "dynamic_img_pad": dynamic and pad}
        return {k: values[k] for k in self.dynamic_args} if self.dynamic else {}


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
