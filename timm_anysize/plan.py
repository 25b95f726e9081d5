"""Resolving a spec against timm: the base architecture, the source geometry of the weights and the target geometry
of the model, all read off models built on the ``meta`` device (no memory, no weights read).

The first step of loading a variant (:func:`timm_anysize.builder.build_variant`): the plan is everything the later
steps need -- the geometries, the kwargs of both models, the layout of every geometry-dependent tensor, and the
transformers ``config.json`` that speaks for the weights (read once here, by :func:`timm_anysize.weights.source_config`,
and carried on to the weights' read). A plan of a spec without call-time overrides is made once and reused.

:func:`spec_target` is what the spec asks for without building anything: what a variant registers before its plan
is made (``import timm_anysize`` builds no model).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import fnmatch
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import timm
import torch
import torch.nn as nn
from timm.layers import get_spatial_dim
from timm.models import get_pretrained_cfg, model_entrypoint

from timm_anysize.core.errors import AdaptationError, SpecError
from timm_anysize.core.family import Family, classify_changes, tensor_layouts
from timm_anysize.core.meta import EmptyOutputError, build_meta, no_empty_outputs
from timm_anysize.core.report import summarize_keys
from timm_anysize.core.spec import Size2, VariantSpec
from timm_anysize.dynamic import enable_dynamic
from timm_anysize.families import FAMILIES, family_of, generic_family
from timm_anysize.origins import config_geometry, model_numerics
from timm_anysize.weights import source_config

__all__ = [
    "Geometry",
    "TensorResample",
    "VariantPlan",
    "tensor_resamples",
    "make_plan",
    "check_build_memory",
    "resolve_base_cfg",
    "spec_target",
    "with_config_geometry",
    "geometry_of",
]


@dataclass(frozen=True)
class Geometry:
    """What the weights or the model are shaped for."""

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


@dataclass(frozen=True)
class VariantPlan:
    """A spec resolved against timm: everything needed to build the model and adapt the weights."""

    spec: VariantSpec
    family: Family
    base_cfg: dict[str, Any]
    source: Geometry
    target: Geometry
    source_kwargs: dict[str, Any] = field(repr=False)
    target_kwargs: dict[str, Any] = field(repr=False)
    dynamic: bool = True
    source_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)  # timm's layout, by key
    resamples: dict[str, TensorResample] = field(default_factory=dict, repr=False)
    feature_size: Optional[Size2] = None  # H x W of forward_features at the target size, where the base has pool_size
    # The transformers config.json that speaks for the weights (read once, when the plan was made): its geometry
    # filled the spec's unset pretrained fields, and the weights' read checks the checkpoint against it.
    config: Optional[dict[str, Any]] = field(default=None, repr=False, compare=False)
    # What the source model computes (origins.model_numerics): checked against an origin's stated numerics.
    source_numerics: dict[str, tuple] = field(default_factory=dict, repr=False)
    # What the target model costs in memory (parameters, every buffer, the largest attention map of one image).
    cost: Optional[CostEstimate] = field(default=None, repr=False, compare=False)

    @property
    def dynamic_kwargs(self) -> dict[str, bool]:
        """timm constructor args for the resolved dynamic/pad choice (said explicitly either way: some timm archs
        default to dynamic, and EVA builds its RoPE for it); none for families whose constructors lack them."""
        return self.family.dynamic_kwargs(self.dynamic, self.spec.pad)

    @property
    def square_only(self) -> bool:
        """The base's timm constructor takes square sizes only (MViTv2): a non-square target is built square and
        its width tables refitted (:mod:`timm_anysize.families._square_build`)."""
        return self.family.square_only

    @property
    def patch_keys(self) -> tuple[str, ...]:
        """State-dict keys of the first kernel(s) the input meets: the patch projection (one per branch for
        CrossViT), or a conv stem's first convolution. Their input channels are adapted; patch kernels resized."""
        names = self.family.first_conv or self.base_cfg.get("first_conv") or "patch_embed.proj"
        names = (names,) if isinstance(names, str) else tuple(names)
        return tuple(f"{n}.weight" for n in names)

    @property
    def patch_key(self) -> str:
        """State-dict key of the (first) patch-embedding kernel."""
        return self.patch_keys[0]

    @property
    def classifier_keys(self) -> tuple[str, ...]:
        """State-dict keys of the classifier head(s), from the base's pretrained cfg."""
        names = self.base_cfg.get("classifier") or "head"
        names = (names,) if isinstance(names, str) else tuple(names)
        return tuple(f"{n}.{p}" for n in names for p in ("weight", "bias"))

    def steps(self) -> list[tuple[str, str]]:
        """The non-copy steps adaptation will take, as (key, description), before any weights are read."""

        s, t, spec = self.source, self.target, self.spec
        out = []
        by_change: dict[tuple[str, Size2, Size2], list[str]] = {}
        for key, r in self.resamples.items():
            if r.changes:
                by_change.setdefault((r.kind, r.source, r.target), []).append(key)
        pe = spec.adapt.pos_embed
        for (kind, a, b), keys in by_change.items():
            what = _KIND_STEP[kind].format(a="x".join(map(str, a)), b="x".join(map(str, b)))
            if kind == "pos_tokens":
                prefix = self.resamples[keys[0]].prefix
                what += f" ({pe.interpolation}, antialias={pe.use_antialias}, {prefix} prefix kept)"
            out.append((summarize_keys(keys), what))
        if s.patch_size != t.patch_size and s.patch_size is not None and t.patch_size is not None:
            pm = spec.adapt.patch_embed
            out.append(
                (
                    ", ".join(self.patch_keys),
                    f"resize kernel {s.patch_size[0]}x{s.patch_size[1]} -> {t.patch_size[0]}x{t.patch_size[1]} "
                    f"({'FlexiViT PI-resize' if pm.method == 'pi' else 'plain interpolation'}, {pm.interpolation})",
                )
            )
        if s.in_chans != t.in_chans:
            ch = spec.adapt.channels
            how = "timm adapt_input_conv" if ch.method == "timm" else f"channel map {list(ch.map or ())}"
            out.append((", ".join(self.patch_keys), f"adapt input channels {s.in_chans} -> {t.in_chans} ({how})"))
        if s.num_classes != t.num_classes:
            for key in self.classifier_keys:
                out.append((key, f"new head: num_classes {s.num_classes} -> {t.num_classes}"))
        for pattern in spec.adapt.init_keys:
            out.append((pattern, "left at fresh initialisation (adapt.init_keys)"))
        for pattern in spec.adapt.drop_keys:
            out.append((pattern, "source keys dropped (adapt.drop_keys)"))
        return out


_KIND_STEP = {
    "pos_tokens": "resample grid {a} -> {b}",
    "pos_nchw": "resample grid {a} -> {b}",
    "pos_nhwc": "resample grid {a} -> {b}",
    "rel_table": "resize relative-position tables, window {a} -> {b}",
    "bias_grid": "resize attention-bias grids {a} -> {b}",
    "rel_axis": "resize relative-position axes {a} -> {b} entries (linear)",
    "pos_blocks": "resample blocked grid {a} -> {b}",
}


def _img_size(model: nn.Module, family: Family, base_cfg: dict[str, Any], given: Any = None) -> Size2:
    """The input size a model was built for: the one it was given, its patch embedding's, the model's own, else its
    pretrained cfg's (several families keep no record of it)."""
    pe = family.patch_embed(model)
    candidates = (
        given,
        getattr(pe, "img_size", None),
        getattr(model, "img_size", None),
        base_cfg.get("input_size", (0,))[1:],
    )
    for size in candidates:
        if isinstance(size, int):
            return (size, size)
        if size is not None and len(size) != 0:
            return (int(size[0]), int(size[1]))
    raise SpecError(f"cannot tell the input size of {type(model).__name__}; set img_size")


def geometry_of(
    model: nn.Module, family: Family, base_cfg: Optional[dict[str, Any]] = None, img_size: Any = None
) -> Geometry:
    """Read the geometry off a built model (works on the meta device).

    Example:
        >>> import timm
        >>> from timm_anysize.families import family_of
        >>> m = timm.create_model("test_vit", img_size=(32, 48))
        >>> geometry_of(m, family_of(m)).grid_size
        (2, 3)
    """
    return Geometry(
        img_size=_img_size(model, family, base_cfg or {}, img_size),
        patch_size=family.patch_size(model),
        grid_size=family.grid_size(model),
        in_chans=int(getattr(model, "in_chans", 3)),
        num_classes=int(getattr(model, "num_classes", 0)),
        num_prefix_tokens=family.num_prefix_tokens(model),
    )


def resolve_base_cfg(spec: VariantSpec) -> dict[str, Any]:
    """The pretrained cfg of the spec's base (``arch[.tag]``), checking the arch and tag exist in timm (no model built).

    Raises:
        SpecError: timm has no such architecture or tag; the message lists close names or the tags there are.

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> resolve_base_cfg(parse_variant("v", {"base": "vit_tiny_patch16_224.augreg_in21k_ft_in1k"}))["input_size"]
        (3, 224, 224)
    """
    if not timm.is_model(spec.arch):
        close = difflib.get_close_matches(spec.arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise SpecError(f"{spec.where}.base: unknown timm model {spec.arch!r}{hint} (see timm.list_models())")
    try:
        cfg = get_pretrained_cfg(spec.base)
    except RuntimeError:  # timm raises for an unknown tag
        cfg = None
    if cfg is None and spec.base_tag:
        tags = timm.list_pretrained(f"{spec.arch}.*")
        raise SpecError(
            f"{spec.where}.base: timm has no pretrained tag {spec.base_tag!r} for {spec.arch}; "
            f"available: {', '.join(tags) or 'none'}"
        )
    return cfg.to_dict() if cfg is not None else {}


def _rows_of_arch(arch: str) -> Optional[tuple[Family, ...]]:
    """The family rows of the class timm's entrypoint for ``arch`` is annotated to return (most are:
    ``-> VisionTransformer``), found without building it: () for a class no row claims (the generic path), None when
    the entrypoint names no class."""
    try:
        returns = model_entrypoint(arch).__annotations__.get("return")
    except (RuntimeError, AttributeError):
        return None
    if not isinstance(returns, type) or not issubclass(returns, nn.Module):
        return None
    return tuple(row for row in FAMILIES if returns in row.classes)


def patch_from_model(spec: VariantSpec) -> bool:
    """Whether the variant's patch size is only known once its model is built: the spec leaves it to the base, and
    the base's family embeds patches (or its entrypoint names no class to tell).

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> patch_from_model(parse_variant("v", {"base": "vit_tiny_patch16_224"}))
        True
        >>> patch_from_model(parse_variant("v", {"base": "convnext_atto"}))
        False
    """
    if spec.patch_size is not None:
        return False
    rows = _rows_of_arch(spec.arch)
    return rows is None or any(row.patch_embeds for row in rows)


def spec_target(spec: VariantSpec, base_cfg: Mapping[str, Any]) -> tuple[Geometry, bool]:
    """The target geometry and the dynamic choice a spec asks for, from its own fields and the base's pretrained cfg
    alone (no model built): what a variant registers until its plan is made.

    What the spec leaves unset is the base cfg's (input size, channels, classes), as timm's builder passes them to
    the constructor; the patch size the spec does not set, the grid and the prefix tokens need the model (None, None,
    0). ``dynamic`` left unset is what the family of the class the base's entrypoint returns supports (read off its
    annotation; the generic path: what the base cfg's ``fixed_input_size`` says; dynamic when it names no class).

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> spec = parse_variant("v", {"base": "vit_tiny_patch16_224", "img_size": 64, "in_chans": 1})
        >>> target, dynamic = spec_target(spec, resolve_base_cfg(spec))
        >>> target.img_size, target.in_chans, target.num_classes, dynamic
        ((64, 64), 1, 1000, True)
    """
    in_chans, *size = base_cfg.get("input_size") or (3, 224, 224)
    rows = _rows_of_arch(spec.arch)
    img = spec.img_size
    if img is None and spec.pretrained.img_size is not None and any("img_larger" in r.unsupported for r in rows or ()):
        img = spec.pretrained.img_size  # a family bound to one input size takes the weights' size (as _make_plan)
    if rows:
        choices = {r.supports_dynamic for r in rows}
        default = choices.pop() if len(choices) == 1 else True
    else:
        default = True if rows is None else not base_cfg.get("fixed_input_size", False)
    target = Geometry(
        img_size=tuple(img) if img is not None else (int(size[0]), int(size[1])),  # type: ignore[arg-type]
        patch_size=spec.patch_size,
        grid_size=None,
        in_chans=spec.in_chans if spec.in_chans is not None else int(in_chans),
        num_classes=spec.num_classes if spec.num_classes is not None else int(base_cfg.get("num_classes", 1000)),
        num_prefix_tokens=0,
    )
    return target, default if spec.dynamic is None else spec.dynamic


def _geometry_kwargs(img_size: Any, patch_size: Any, in_chans: Any, num_classes: Any) -> dict[str, Any]:
    if isinstance(patch_size, tuple) and patch_size[0] == patch_size[1]:
        patch_size = patch_size[0]  # some constructors (Twins) take an int only; every one takes an int
    given = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes)
    return {k: v for k, v in given.items() if v is not None}


MEMORY_BUDGET_ENV = "TIMM_ANYSIZE_MAX_BYTES"
# Without TIMM_ANYSIZE_MAX_BYTES: this share of the machine's physical memory (64 GiB where it cannot be read).
MEMORY_BUDGET_SHARE = 0.75
FALLBACK_MEMORY_BUDGET = 64 * 2**30

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n: float) -> str:
    """A byte count for people: ``1.5 GiB``, ``512 B``.

    Example:
        >>> format_bytes(3 * 2**29), format_bytes(512)
        ('1.5 GiB', '512 B')
    """
    unit = 0
    while abs(n) >= 1024 and unit < len(_UNITS) - 1:
        n, unit = n / 1024, unit + 1
    return f"{n:,.0f} B" if unit == 0 else f"{n:,.1f} {_UNITS[unit]}"


def physical_memory() -> Optional[int]:
    """The machine's physical memory in bytes, or None where the OS does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def memory_budget() -> tuple[int, str]:
    """The bytes a variant's geometry may cost, and where that figure comes from: ``TIMM_ANYSIZE_MAX_BYTES``, else
    75 % of the machine's physical memory (64 GiB where the OS does not say).

    Raises:
        SpecError: ``TIMM_ANYSIZE_MAX_BYTES`` is not a whole number of bytes.

    Example:
        >>> import os
        >>> os.environ["TIMM_ANYSIZE_MAX_BYTES"] = str(2**30)
        >>> memory_budget()
        (1073741824, 'TIMM_ANYSIZE_MAX_BYTES')
        >>> del os.environ["TIMM_ANYSIZE_MAX_BYTES"]
    """
    raw = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = -1
        if value <= 0:
            raise SpecError(
                f"{MEMORY_BUDGET_ENV}={raw!r}: not a positive whole number of bytes; set it to e.g. "
                f"{16 * 2**30} (16 GiB), or unset it for 75% of this machine's memory"
            )
        return value, MEMORY_BUDGET_ENV
    total = physical_memory()
    if total is None:
        return FALLBACK_MEMORY_BUDGET, f"the default; this OS does not say its memory; {MEMORY_BUDGET_ENV} sets it"
    return int(total * MEMORY_BUDGET_SHARE), f"75% of this machine's {format_bytes(total)}; {MEMORY_BUDGET_ENV} sets it"


@dataclass(frozen=True)
class CostEstimate:
    """What a model at one geometry costs in memory, from its meta-device build: every parameter and every buffer
    (persistent or not, each at its own dtype) plus the largest attention of one image: its map, times the maps alive
    at once (``attention_maps``: 1 for timm's fused attention, 4 where the scores are materialised: scores, a bias or
    mask of their size, the softmax and a temporary; measured on BEiT and CaiT at 12,545 tokens, 3.1 and 3.0), and
    what the family holds per token besides (``Family.token_bytes``), counted in ``attention_bytes``.

    ``largest`` names the biggest tensors, as (what, bytes), biggest first; ``scaling`` splits the total into the
    bytes that stay, grow with the tokens and grow with their square: what :meth:`at_tokens` scales by.
    """

    params_bytes: int
    buffers_bytes: int
    attention_bytes: int
    tokens: int
    heads: int
    largest: tuple[tuple[str, int], ...] = ()
    scaling: tuple[int, int, int] = (0, 0, 0)
    # (floating-point entries, their bytes): the part a model built in another dtype scales (integer indices stay).
    floating: tuple[int, int] = (0, 0)
    attention_maps: int = 1  # attention_bytes is this many maps

    @property
    def total(self) -> int:
        """Parameters, buffers and the attention map, in bytes."""
        return self.params_bytes + self.buffers_bytes + self.attention_bytes

    def total_in(self, dtype: torch.dtype) -> int:
        """The total for the model built in ``dtype`` (``timm.create_model(..., dtype=...)``): its floating-point
        tensors and the attention map at that dtype's size, integer buffers as they are."""
        entries, size = self.floating
        return self.total - size + entries * dtype.itemsize

    def at_tokens(self, tokens: int) -> float:
        """The estimate at another token count, every tensor scaled by how it grows with the tokens."""
        r = tokens / max(self.tokens, 1)
        fixed, linear, square = self.scaling
        return fixed + linear * r + square * r * r

    def describe(self) -> str:
        """One line, e.g. ``~846 KiB at 17 tokens: weights 839 KiB, buffers 5.0 KiB, attention map 2.1 KiB (2 heads,
        one image); largest: ...``."""
        maps = f"{self.attention_maps} maps of " if self.attention_maps > 1 else ""
        attention = (
            f"attention map {format_bytes(self.attention_bytes)} ({maps}{self.heads} head{'s' if self.heads != 1 else ''}"
            f", one image)"
            if self.attention_bytes
            else "no attention map"
        )
        line = (
            f"~{format_bytes(self.total)} at {self.tokens:,} tokens: weights {format_bytes(self.params_bytes)}, "
            f"buffers {format_bytes(self.buffers_bytes)}, {attention}"
        )
        return line + (f"; largest: {self.largest[0][0]} = {format_bytes(self.largest[0][1])}" if self.largest else "")


def _shape_words(shape: tuple[int, ...]) -> str:
    """``50,177²`` for a square matrix, else ``[2, 3, 4]``."""
    if len(shape) == 2 and shape[0] == shape[1]:
        return f"{shape[0]:,}²"
    return "[" + ", ".join(f"{d:,}" for d in shape) + "]"


_TENSOR_WORDS = (
    ("relative_position_index", "relative-position index"),
    ("relative_position_bias_table", "relative-position table"),
    ("attention_bias_idxs", "attention-bias index"),
    ("attention_biases", "attention-bias grid"),
    ("rel_pos", "relative-position axis"),
    ("pos_embed", "position embedding"),
    ("attn_mask", "attention mask"),
)


def _what(name: str, t: torch.Tensor, buffer: bool, count: int) -> str:
    """``relative-position index `blocks.0.attn.relative_position_index` (50,177², int64, in 2 modules)``."""
    kind = next((w for k, w in _TENSOR_WORDS if k in name), "buffer" if buffer else "parameter")
    dtype = str(t.dtype).replace("torch.", "")
    each = f", {count} of them" if count > 1 else ""
    return f"{kind} `{name}` ({_shape_words(tuple(t.shape))} entries, {dtype}{each})"


def _token_power(shape: tuple[int, ...], grid_tokens: int, has_grid: bool) -> int:
    """How a tensor grows with the tokens (0, 1 or 2): how many of its dimensions are token-sized (between a 64th
    (no patch grid: stages at up to 8x the first stage's stride) or a quarter of the grid's tokens and 8x them), read
    only at 1,024 grid tokens or more, where no weight matrix's width is near the token count."""
    if grid_tokens < 1024:
        return 0
    low = grid_tokens / (64 if not has_grid else 4)
    return min(2, sum(1 for d in shape if low <= d <= 8 * grid_tokens))


_BIAS_ATTRS = ("relative_position_bias_table", "relative_position_index", "rel_pos_h", "attention_biases", "rel_pos")


def _maps_alive(module: nn.Module) -> int:
    """How many attention maps an attention module holds at once: 1 for timm's fused attention
    (``scaled_dot_product_attention`` without a mask), else 4 (scores, a bias of their size, softmax, a temporary)."""
    fused = getattr(module, "fused_attn", False) is True
    biased = any(getattr(module, a, None) is not None for a in _BIAS_ATTRS)
    return 1 if fused and not biased else 4


def _attention(
    model: nn.Module, tokens: int, grid_tokens: int, has_grid: bool, maps_alive: Optional[int] = None
) -> tuple[int, int, int, int]:
    """(bytes, heads, token power, maps) of the largest attention of one image, float32: tokens² x heads of the first
    global attention (the first stage sees the most tokens), tokens x window of the first windowed one, its own
    resolution's of one that keeps it (LeViT); tokens² of one head for a model with a patch grid whose attention
    names no heads; none without either. The bytes are ``maps`` maps: ``maps_alive`` (the family's
    ``attention_maps``), else :func:`_maps_alive`."""
    best, heads_seen, power, seen, maps = 0, 0, 0, set(), 1
    for module in model.modules():
        heads = getattr(module, "num_heads", getattr(module, "heads", None))
        if not isinstance(heads, int) or isinstance(heads, bool) or heads <= 0:
            continue
        window, resolution = getattr(module, "window_size", None), getattr(module, "resolution", None)
        if isinstance(resolution, (int, tuple, list)) and resolution:
            n = math.prod(resolution) if not isinstance(resolution, int) else resolution * resolution
            size, p = n * n * heads * 4, 2
        elif "window" in seen and "global" in seen:
            continue
        elif isinstance(window, (int, tuple, list)) and window:
            if "window" in seen:
                continue
            seen.add("window")
            keys = math.prod(window) if not isinstance(window, int) else window * window
            keys = tokens if keys >= grid_tokens else keys  # a window the size of the grid (BEiT): global
            size, p = tokens * keys * heads * 4, 1 if keys < tokens else 2
        elif "global" not in seen:
            seen.add("global")
            size, p = tokens * tokens * heads * 4, 2
        else:
            continue
        alive = maps_alive or _maps_alive(module)
        size *= alive
        if size > best:
            best, heads_seen, power, maps = size, heads, p, alive
    if not best and has_grid:
        return tokens * tokens * 4, 1, 2, 1
    return best, heads_seen, power, maps


def estimate_cost(model: nn.Module, geometry: Geometry, family: Optional[Family] = None) -> CostEstimate:
    """What a (meta-device) model at ``geometry`` costs: its parameters and all its buffers, persistent or not, at
    their own dtypes, plus the largest attention map of one image at its tokens (see :class:`CostEstimate`).

    ``family``: its geometry-dependent parameters (position embeddings, relative-position tables) are the ones that
    grow with the tokens; without it, only buffers may.

    Example:
        >>> import timm
        >>> from timm_anysize.core.meta import meta_device
        >>> from timm_anysize.families import family_of
        >>> with meta_device():
        ...     m = timm.create_model("test_vit", img_size=64, patch_size=16)
        >>> cost = estimate_cost(m, geometry_of(m, family_of(m)))
        >>> cost.tokens, cost.heads, cost.attention_bytes == 17 * 17 * 2 * 4
        (17, 2, True)
    """
    tokens = geometry.num_tokens
    grid_tokens = max(tokens - geometry.num_prefix_tokens, 1)
    has_grid = geometry.grid_size is not None
    layouts = tensor_layouts(family, [n for n, _ in model.named_parameters()]) if family is not None else {}
    scaling = [0, 0, 0]
    groups: dict[tuple[str, tuple[int, ...]], list[Any]] = {}  # the same tensor in every block: one entry
    sizes = {"params": 0, "buffers": 0}
    floating = [0, 0]
    for kind, named in (("params", model.named_parameters()), ("buffers", model.named_buffers())):
        for name, t in named:
            size = t.numel() * t.element_size()
            sizes[kind] += size
            if t.is_floating_point():
                floating[0] += t.numel()
                floating[1] += size
            grows = kind == "buffers" or name in layouts
            scaling[_token_power(tuple(t.shape), grid_tokens, has_grid) if grows else 0] += size
            group = groups.setdefault((re.sub(r"\.\d+\.", ".*.", name), tuple(t.shape)), [name, t, kind, 0, 0])
            group[3] += size
            group[4] += 1
    family_maps = family.attention_maps if family is not None else None
    attn, heads, power, maps = _attention(model, tokens, grid_tokens, has_grid, family_maps)
    scaling[power] += attn
    floating[0] += attn // 4
    floating[1] += attn
    per_token = family.token_bytes(model) if family is not None and family.token_bytes is not None else 0
    if per_token:  # activations the family holds per token besides the maps: counted with them, growing linearly
        attn += tokens * per_token
        scaling[1] += tokens * per_token
    entries = [(_what(name, t, kind == "buffers", count), size) for name, t, kind, size, count in groups.values()]
    if attn:
        times = f"{maps} maps alive at once, " if maps > 1 else ""
        what = "the attention and per-token activations" if per_token else "the attention"
        entries.append((f"{what} of one image ({tokens:,} tokens, {heads} heads, {times}float32)", attn))
    largest = tuple(sorted(entries, key=lambda e: -e[1])[:3])
    return CostEstimate(
        sizes["params"],
        sizes["buffers"],
        attn,
        tokens,
        heads,
        largest,
        tuple(scaling),
        tuple(floating),  # type: ignore[arg-type]
        maps,
    )


def _fitting_geometries(cost: CostEstimate, geometry: Geometry, budget: int) -> list[str]:
    """The nearest geometries whose estimate (scaled from ``cost`` by their tokens) fits ``budget``: the largest
    img_size at the same patch (same aspect), and the smallest larger patch that divides the img_size."""
    prefix = geometry.num_prefix_tokens
    (h, w), patch = geometry.img_size, geometry.patch_size
    step = patch or (32, 32)
    stride = patch or (4, 4)

    def fits(img: Size2, p: Size2) -> bool:
        return cost.at_tokens((img[0] // p[0]) * (img[1] // p[1]) + prefix) <= budget

    def scaled(rows: int) -> Size2:  # ``rows`` steps down the height, the width in the same aspect
        return (rows * step[0], max(1, round(rows * step[0] * w / h / step[1])) * step[1])

    out = []
    lo, hi = 0, h // step[0]  # the most rows that fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(scaled(mid), stride) else (lo, mid - 1)
    if lo and scaled(lo) != (h, w):
        out.append(f"img_size {list(scaled(lo))}")
    if patch is not None:
        for k in range(2, max(h // patch[0], w // patch[1]) + 1):
            p = (patch[0] * k, patch[1] * k)
            if h % p[0] == 0 and w % p[1] == 0 and fits((h, w), p):
                out.append(f"patch_size {p[0] if p[0] == p[1] else list(p)} at img_size {[h, w]}")
                break
    return out


def _check_memory(spec: VariantSpec, model: nn.Module, geometry: Geometry, key: str, family: Family) -> CostEstimate:
    """Reject a geometry whose estimate (:func:`estimate_cost`) exceeds the budget (:func:`memory_budget`) even in
    half precision, before anything is allocated, naming what makes it large and the nearest geometry that fits.

    The plan does not know the dtype the model will be built in: a geometry that fits in bfloat16 (a 7B ViT on a
    24 GB machine) is accepted here, and :func:`check_build_memory` refuses the build in a dtype that does not fit.
    """
    budget, where = memory_budget()
    cost = estimate_cost(model, geometry, family)
    if cost.total > budget and cost.total_in(torch.bfloat16) > budget:
        big = "; ".join(f"{what} = {format_bytes(size)}" for what, size in cost.largest[:2])
        near = _fitting_geometries(cost, geometry, budget)
        fix = f"nearest that fit: {' or '.join(near)}; " if near else "no smaller geometry helps (the weights alone); "
        raise SpecError(
            f"{spec.where}.{key}: {geometry.describe()} needs an estimated {format_bytes(cost.total)} "
            f"(weights {format_bytes(cost.params_bytes)}, buffers {format_bytes(cost.buffers_bytes)}, the attention of "
            f"one image {format_bytes(cost.attention_bytes)} at {cost.tokens:,} tokens; "
            f"~{format_bytes(cost.total_in(torch.bfloat16))} in bfloat16), over the {format_bytes(budget)} "
            f"budget ({where}); what makes it large: {big}; {fix}or raise {MEMORY_BUDGET_ENV}"
        )
    return cost


def check_build_memory(plan: VariantPlan, dtype: Optional[torch.dtype] = None) -> None:
    """Refuse to build a variant in a dtype whose estimate exceeds the budget (:func:`memory_budget`), before any
    tensor is allocated; the error says which dtype fits.

    Args:
        plan: The variant's plan (its :attr:`VariantPlan.cost`).
        dtype: The dtype the model will be built in (``timm.create_model``'s ``dtype``); None: torch's default.

    Raises:
        SpecError: The model in ``dtype`` would not fit.

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> check_build_memory(make_plan(parse_variant("v", {"base": "test_vit", "img_size": 64})), torch.float32)
    """
    if plan.cost is None:
        return
    dtype = dtype or torch.get_default_dtype()
    budget, where = memory_budget()
    need = plan.cost.total_in(dtype)
    if need <= budget:
        return
    half = plan.cost.total_in(torch.bfloat16)
    fix = (
        f"build it in half precision: timm.create_model({plan.spec.name!r}, dtype=torch.bfloat16) needs "
        f"~{format_bytes(half)}; "
        if dtype.itemsize > 2 and half <= budget
        else ""
    )
    raise SpecError(
        f"{plan.spec.where}: built in {str(dtype).replace('torch.', '')} at {plan.target.describe()} it needs an "
        f"estimated {format_bytes(need)}, over the {format_bytes(budget)} budget ({where}); {fix}"
        f"or raise {MEMORY_BUDGET_ENV}"
    )


_default_plans: dict[str, VariantPlan] = {}


def make_plan(
    spec: VariantSpec,
    overrides: Optional[dict[str, Any]] = None,
    weights: Optional[Mapping[str, Any]] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> VariantPlan:
    """Resolve a spec: base cfg, family, source and target geometry, and the ``config.json`` that speaks for the
    weights. Reads no weights, allocates no tensors.

    Args:
        spec: The variant spec.
        overrides: ``timm.create_model`` kwargs that override the spec for this model (``img_size``,
            ``num_classes``, ``in_chans``, ...).
        weights: Where the weights will be read from (the resolved pretrained cfg's ``file`` / ``hf_hub_id`` /
            ``state_dict``... fields) when they will be (``pretrained=True``): the plan takes the transformers
            ``config.json`` of those (a Hub repo's is downloaded). None: only the one beside the spec's own file.
        cache_dir: Cache folder for a Hub download.

    Returns:
        The plan; the same object for the same spec and ``config.json`` when there are no overrides.

    Raises:
        SpecError: The base does not exist, its family is not supported, or the geometry is impossible.
        WeightsError: The ``config.json`` beside weights that will be read is not JSON.

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> plan = make_plan(parse_variant("v", {"base": "test_vit", "img_size": 64, "patch_size": 4}))
        >>> plan.source.grid_size, plan.target.grid_size
        ((10, 10), (16, 16))
    """
    config = source_config(spec, weights, cache_dir)
    if not overrides:
        # The plan of a spec without overrides never changes; each create_model of a variant reuses it. The origin is
        # excluded from dumps but named in errors; a config.json is part of what the plan was made from.
        key = f"{spec.origin}|{spec.model_dump_json()}|{json.dumps(config, sort_keys=True, default=str)}"
        plan = _default_plans.get(key)
        if plan is None:
            plan = _default_plans[key] = _make_plan(spec, {}, config)
        return plan
    return _make_plan(spec, dict(overrides), config)


def _requested_changes(spec: VariantSpec, source: Geometry, target_kwargs: dict[str, Any]) -> list[str]:
    """The geometry changes a spec asks for, from its own fields (before the target model is built)."""

    def size2(v: Any, default: Optional[Size2]) -> Optional[Size2]:
        return default if v is None else ((v, v) if isinstance(v, int) else tuple(v))  # type: ignore[return-value]

    requested = dataclasses.replace(
        source,
        img_size=size2(target_kwargs.get("img_size"), source.img_size),
        patch_size=size2(target_kwargs.get("patch_size"), source.patch_size),
        in_chans=target_kwargs.get("in_chans", source.in_chans),
    )
    return classify_changes(source, requested)


def tensor_resamples(family: Family, source_model: nn.Module, target_model: nn.Module) -> dict[str, TensorResample]:
    """The layout of every geometry-dependent tensor in both models: grids and windows read off the modules."""
    out = {}
    target_sd = target_model.state_dict()
    source_sd = source_model.state_dict()
    token_patterns = [p for p, kind in family.tensors if kind == "pos_tokens"]
    for key, kind in tensor_layouts(family, target_sd).items():
        if key not in source_sd:
            continue
        owner = key.rsplit(".", 1)[0] if "." in key else ""
        if kind == "pos_tokens":
            index = next(i for i, p in enumerate(token_patterns) if fnmatch.fnmatchcase(key, p))
            src, tgt = family.token_grid(source_model, index), family.token_grid(target_model, index)
            out[key] = TensorResample(kind, src, tgt, family.pos_embed_prefix_tokens(source_model))
            continue
        if kind in ("pos_nchw", "pos_nhwc", "rel_axis"):
            dims = {"pos_nchw": slice(2, 4), "pos_nhwc": slice(1, 3), "rel_axis": slice(0, 1)}[kind]
            src, tgt = tuple(source_sd[key].shape[dims]), tuple(target_sd[key].shape[dims])
        elif kind == "pos_blocks":  # square blocks of a square grid (NesT builds square only)
            src, tgt = ((math.isqrt(sd[key].shape[1] * sd[key].shape[2]),) * 2 for sd in (source_sd, target_sd))
        else:
            attr = "window_size" if kind == "rel_table" else "resolution"
            src = tuple(getattr(source_model.get_submodule(owner), attr))
            tgt = tuple(getattr(target_model.get_submodule(owner), attr))
        out[key] = TensorResample(kind, src, tgt)  # type: ignore[arg-type]
    return out


def feature_size(model: nn.Module, geometry: Geometry) -> Size2:
    """The H x W of ``forward_features`` at the geometry's size: a forward on the meta device (shapes only).

    Example:
        >>> import timm
        >>> from timm_anysize.families import family_of
        >>> m = timm.create_model("swin_tiny_patch4_window7_224", img_size=(64, 96), window_size=4)
        >>> feature_size(m, geometry_of(m, family_of(m)))
        (2, 3)
    """
    x = torch.empty(1, geometry.in_chans, *geometry.img_size, device="meta")
    # In eval mode: BatchNorm in training mode refuses a 1 x 1 map of one image (ResNeSt, RexNet, SKNet...). A model
    # with real weights is probed through a meta copy, never moved.
    probe = model if all(p.is_meta for p in model.parameters()) else copy.deepcopy(model).to("meta")
    was_training = probe.training
    try:
        with torch.no_grad():
            out = probe.eval().forward_features(x)
    finally:
        probe.train(was_training)
    h, w = get_spatial_dim(getattr(model, "output_fmt", "NCHW"))
    return (int(out.shape[h]), int(out.shape[w]))


def _call_error(spec: VariantSpec, overrides: dict[str, Any], err: SpecError) -> Exception:
    """A constructor's TypeError caused by a create_model keyword (the spec alone was validated at registration)
    is the caller's error, a TypeError as for any timm model; anything else stays a SpecError."""
    cause = err.__cause__
    if overrides and isinstance(cause, TypeError):
        return TypeError(
            f"timm.create_model({spec.name!r}, ...): {cause} (keyword arguments given: {', '.join(sorted(overrides))})"
        )
    return err


def with_config_geometry(spec: VariantSpec, config: Optional[dict[str, Any]]) -> VariantSpec:
    """``spec`` with the source geometry a transformers ``config.json`` states (``image_size``, ``patch_size``,
    ``num_channels``) filled into the ``pretrained`` fields the spec leaves unset; fields it sets are kept (and
    checked against the config when the weights are read).

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> spec = parse_variant("v", {"base": "test_vit", "img_size": 64})
        >>> with_config_geometry(spec, {"model_type": "vit", "image_size": 32, "patch_size": 8}).pretrained.img_size
        (32, 32)
    """

    src = spec.pretrained
    fill = {k: v for k, v in config_geometry(config).items() if getattr(src, k) is None}
    if not fill:
        return spec
    return spec.model_copy(update={"pretrained": src.model_copy(update=fill)})


def _make_plan(spec: VariantSpec, overrides: dict[str, Any], config: Optional[dict[str, Any]]) -> VariantPlan:
    spec = with_config_geometry(spec, config)
    base_cfg = resolve_base_cfg(spec)
    src = spec.pretrained
    source_kwargs = {
        **spec.model_args,
        **src.model_args,
        **_geometry_kwargs(src.img_size, src.patch_size, src.in_chans, src.num_classes),
    }
    target_kwargs = {
        **spec.model_args,
        **_geometry_kwargs(spec.img_size, spec.patch_size, spec.in_chans, spec.num_classes),
        **overrides,
    }
    source_img, target_img = source_kwargs.get("img_size"), target_kwargs.get("img_size")
    source_model, source_kwargs = _build_sized(spec, source_kwargs, "source (pretrained)")
    # An architecture without a row is adapted generically: same-shape tensors copied, first layer and classifier
    # adapted, and any other tensor whose shape the geometry changes refused by name below.
    family = family_of(source_model) or generic_family(source_model, base_cfg)
    source = geometry_of(source_model, family, base_cfg, source_img)
    if target_img is None and source_img is not None and "img_larger" in family.unsupported:
        # A family bound to one input size takes the weights' size when the spec names none.
        target_img = source_img
        target_kwargs = {**target_kwargs, "img_size": source_img}
    for change in _requested_changes(spec, source, {**target_kwargs, "img_size": target_img}):
        reason = family.unsupported.get(change)
        if reason:
            raise SpecError(f"{spec.where}: the {family.name} family cannot take {change}: {reason}")
    _check_size_multiples(spec, family, source_model, target_kwargs.get("img_size"))
    if spec.dynamic and not family.supports_dynamic:
        raise SpecError(
            f"{spec.where}.dynamic: the {family.name} family cannot run at any input size: {family.dynamic_reason}; "
            f"set dynamic: false (or leave it out: it defaults to what the family supports)"
        )
    try:
        target_model, target_kwargs = _build_sized(spec, target_kwargs, "target", family)
    except SpecError as e:
        raise _call_error(spec, overrides, e) from e.__cause__
    target = geometry_of(target_model, family, base_cfg, target_img)
    for change in classify_changes(source, target):  # what the built model changes, spec defaults included
        reason = family.unsupported.get(change)
        if reason:
            raise SpecError(f"{spec.where}: the {family.name} family cannot take {change}: {reason}")
    dynamic = family.supports_dynamic if spec.dynamic is None else spec.dynamic
    for change in [] if dynamic else classify_changes(source, target):
        reason = family.static_unsupported.get(change)
        if reason:
            raise SpecError(
                f"{spec.where}.dynamic: false builds timm's own {family.name} model at img_size "
                f"{list(target.img_size)}, which cannot run it: {reason}; leave dynamic on (the default)"
            )
    m = family.static_multiple(target_model) if family.static_multiple is not None else 1

    def multiple(axis: int, candidate: int) -> bool:
        return candidate % m == 0

    if not dynamic and any(side % m for side in target.img_size):
        near = sorted({c for i, side in enumerate(target.img_size) if side % m for c in _nearest(side, i, multiple)})
        raise SpecError(
            f"{spec.where}.img_size: dynamic: false builds timm's own {family.name} model at "
            f"{list(target.img_size)}, which runs only at sizes that are multiples of {m}; nearest sides: "
            f"{' or '.join(map(str, near))}; or leave dynamic on (the default)"
        )
    for model, geo, key in ((source_model, source, "pretrained.img_size"), (target_model, target, "img_size")):
        cost = _check_memory(spec, model, geo, key, family)  # the target's, last, is the plan's
    for geo, what, key in ((source, "source", "pretrained.img_size"), (target, "target", "img_size")):
        patch = geo.patch_size or (1, 1)
        for i, p in zip(geo.img_size, patch):
            if i % p:
                raise SpecError(
                    f"{spec.where}.{key}: the {what} patch size {list(patch)} must divide the "
                    f"{what} img_size {list(geo.img_size)}; pick a multiple of the patch"
                )
    if spec.adapt.channels.method == "map":
        cmap = spec.adapt.channels.map or ()
        if len(cmap) != target.in_chans:
            raise SpecError(
                f"{spec.where}.adapt.channels.map: has {len(cmap)} entries, the target has {target.in_chans} channels"
            )
        bad = [c for c in cmap if c is not None and not 0 <= c < source.in_chans]
        if bad:
            raise SpecError(
                f"{spec.where}.adapt.channels.map: source channel {bad[0]} does not exist; the weights have "
                f"{source.in_chans} channels (0..{source.in_chans - 1}), or null for zeros"
            )
    _check_runs_at_own_size(spec, family, (source_model, source), (target_model, target), target_kwargs, dynamic)
    plan = VariantPlan(
        spec=spec,
        family=family,
        base_cfg=base_cfg,
        source=source,
        target=target,
        source_kwargs=source_kwargs,
        target_kwargs=target_kwargs,
        dynamic=dynamic,
        source_shapes={k: tuple(v.shape) for k, v in source_model.state_dict().items()},
        resamples=tensor_resamples(family, source_model, target_model),
        feature_size=_target_feature_size(spec, base_cfg, target_model, target),
        config=config,
        source_numerics=model_numerics(source_model),
        cost=cost,
    )
    if family.generic:
        _refuse_geometry_bound(plan, {k: tuple(v.shape) for k, v in target_model.state_dict().items()})
    return plan


def _build_sized(
    spec: VariantSpec, kwargs: dict[str, Any], what: str, family: Optional[Family] = None
) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`build_meta`, and the kwargs it was built with: constructors without an ``img_size`` argument (most
    CNNs, which take any size) are built without it; the size stays the variant's (its data cfg, its report)."""
    try:
        return build_meta(spec, kwargs, what, family), kwargs
    except SpecError as e:
        cause = e.__cause__
        if "img_size" not in kwargs or not isinstance(cause, TypeError) or "img_size" not in str(cause):
            raise
    kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
    return build_meta(spec, kwargs, what, family), kwargs


def _refuse_geometry_bound(plan: VariantPlan, target_shapes: dict[str, tuple[int, ...]]) -> None:
    """An architecture without a family row: every tensor other than the first layer's kernel (input channels
    only) and the classifier (a new ``num_classes``) must keep its shape, or the plan is refused naming them."""

    s, t, source_shapes = plan.source, plan.target, plan.source_shapes
    heads = set(plan.classifier_keys) if s.num_classes != t.num_classes else set()
    bad = []
    for key in [*target_shapes, *(k for k in source_shapes if k not in target_shapes)]:
        a, b = source_shapes.get(key), target_shapes.get(key)
        if a == b or key in heads:
            continue
        if key in plan.patch_keys and a is not None and b is not None and len(a) == len(b) == 4:
            if (a[0], *a[2:]) == (b[0], *b[2:]) and (a[1], b[1]) == (s.in_chans, t.in_chans):
                continue  # input channels adapted (adapt_input_conv)
        bad.append(key)
    if bad:
        shapes = "; ".join(f"{k}: {source_shapes.get(k)} -> {target_shapes.get(k)}" for k in bad[:3])
        raise AdaptationError(
            f"{plan.spec.where}: {plan.spec.arch} ({_type_name(plan)}, no family row) has tensors whose shape "
            f"depends on the geometry ({s.compact()} -> {t.compact()}): {summarize_keys(bad)} ({shapes}). Without "
            f"a row timm-anysize only adapts the first layer's input channels and the classifier: keep the geometry "
            f"the weights have (pretrained.img_size / in_chans), or add a family row that says how to resample them"
        )


def _type_name(plan: VariantPlan) -> str:
    """The model class a plan builds."""
    return plan.family.classes[0].__name__ if plan.family.classes else plan.spec.arch


def _nearest(size: int, axis: int, fits) -> list[int]:
    """The closest sizes below and above ``size`` (on one axis) for which ``fits(axis, candidate)``."""
    below = next((c for c in range(size - 1, 0, -1) if fits(axis, c)), None)
    above = next((c for c in range(size + 1, 64 * size + 64) if fits(axis, c)), None)
    return [c for c in (below, above) if c is not None]


def _check_size_multiples(spec: VariantSpec, family: Family, model: nn.Module, img_size: Any) -> None:
    """Reject an img_size whose branches/stages cannot run at it (``Family.size_multiples``), naming the
    constraint and the nearest sizes that work."""
    if family.size_multiples is None or img_size is None:
        return
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)

    def fits(axis: int, candidate: int) -> bool:
        probe = tuple(candidate if a == axis else s for a, s in enumerate(size))
        return all(got[axis] % mult[axis] == 0 for _, got, mult in family.size_multiples(model, probe))

    for what, got, mult in family.size_multiples(model, size):
        for axis, name in enumerate(("height", "width")):
            if got[axis] % mult[axis]:
                near = " or ".join(map(str, _nearest(size[axis], axis, fits)))
                raise SpecError(
                    f"{spec.where}.img_size: {family.name} cannot run at {list(size)}: {what} gets "
                    f"{list(got)} px, and its {name} {got[axis]} is not a multiple of its patch {mult[axis]}; "
                    f"nearest {name}s that work: {near}"
                )


# Exceptions a forward raises when the input size does not fit the model (timm's asserts, reshapes, broadcasts).
_SHAPE_ERRORS = (RuntimeError, AssertionError, ValueError, IndexError, TypeError)


def _meta_forward(model: nn.Module, in_chans: int, img_size: Size2) -> Optional[Exception]:
    """Run one forward of a meta-device model on a meta image of ``img_size``: None where it runs, the error where
    it fails on the shapes, and :data:`_UNKNOWN` where the meta device cannot say (an op without a meta kernel, or
    any other error)."""
    x = torch.empty(1, in_chans, *img_size, device="meta")
    was_training = model.training
    try:
        with torch.no_grad(), no_empty_outputs():
            model.eval()(x)
    except NotImplementedError:  # an op with no meta kernel: no answer, not a refusal
        return _UNKNOWN
    except _SHAPE_ERRORS as e:
        return e
    except Exception:  # anything else says nothing about the size
        return _UNKNOWN
    finally:
        model.train(was_training)
    return None


_UNKNOWN = NotImplementedError("the meta device cannot tell")


def _dynamic_meta_model(spec: VariantSpec, family: Family, kwargs: dict[str, Any]) -> nn.Module:
    """The model a dynamic variant runs, on the meta device: built with the family's dynamic arguments and made
    dynamic as :func:`timm_anysize.builder.build_variant` makes it (its run-time path, not timm's fixed-size one)."""
    model = build_meta(spec, {**kwargs, **family.dynamic_kwargs(True, spec.pad)}, "target", family)
    if family.dynamic != "native":
        enable_dynamic(model, pad=spec.pad)
    return model


def _static_model(spec: VariantSpec, family: Family, model: nn.Module, kwargs: dict[str, Any]) -> nn.Module:
    """The model ``dynamic: false`` builds: the plan's own, unless the family's dynamic arguments (said explicitly
    at build time, :attr:`VariantPlan.dynamic_kwargs`) differ from what it was built with."""
    static = family.dynamic_kwargs(False, spec.pad)
    if all(getattr(model, k, v) == v for k, v in static.items()):
        return model
    return build_meta(spec, {**kwargs, **static}, "target", family)


def _sizes_that_run(
    spec: VariantSpec, family: Family, model: nn.Module, kwargs: dict[str, Any], in_chans: int, size: Size2
) -> list[Size2]:
    """Up to two sizes near ``size`` at which timm's own model runs: both sides at the multiples of 16, 32 or 64
    around them, nearest first, at most 10 probed (each a meta build and a meta forward)."""

    def sides(v: int, m: int) -> set[int]:  # v if a multiple of m, else the multiples of m either side
        return {c for c in (v // m * m, -(-v // m) * m) if c > 0}

    near = {(a, b) for m in (16, 32, 64) for a in sides(size[0], m) for b in sides(size[1], m)} - {tuple(size)}
    candidates = sorted(near, key=lambda c: (abs(c[0] - size[0]) + abs(c[1] - size[1]), c))
    static = family.dynamic_kwargs(False, spec.pad)
    found: list[Size2] = []
    for cand in candidates[:10]:
        if "img_size" in kwargs:  # timm builds the model for its size, as dynamic: false builds it
            try:
                probe = build_meta(spec, {**kwargs, "img_size": cand, **static}, "probe", family)
            except SpecError:
                continue
        else:
            probe = model
        if _meta_forward(probe, in_chans, cand) is None:
            found.append(cand)
            if len(found) == 2:
                break
    return found


def _check_runs_at_own_size(
    spec: VariantSpec,
    family: Family,
    source: tuple[nn.Module, Geometry],
    target: tuple[nn.Module, Geometry],
    kwargs: dict[str, Any],
    dynamic: bool,
) -> None:
    """timm's model at the variant's size must run it: one forward on the meta device (shapes only); refused with
    timm's error and the nearest sizes that run. ``dynamic: false`` checks the model it builds (the family's static
    arguments); a dynamic variant, the model at its own size (an image too small for the stem and strides). Not
    refused where the meta device cannot tell (an op without a meta kernel, or a forward that fails at the weights'
    own size too)."""
    (source_model, source_geo), (target_model, target_geo) = source, target
    model = _dynamic_meta_model(spec, family, kwargs) if dynamic else _static_model(spec, family, target_model, kwargs)
    source_sd = source_model.state_dict()
    # A tensor the weights have that comes out empty at this size (LeViT's attention biases of a stage whose
    # resolution rounds to 0): the image is too small for the stages; the meta device would not notice.
    empty = [k for k, v in model.state_dict().items() if v.numel() == 0 and k in source_sd and source_sd[k].numel()]
    error = (
        EmptyOutputError(f"{empty[0]} is empty at this size ({len(empty)} tensors): too small for its stages")
        if empty
        else _meta_forward(model, target_geo.in_chans, target_geo.img_size)
    )
    if error is None or error is _UNKNOWN:
        return
    if _meta_forward(source_model, source_geo.in_chans, source_geo.img_size) is not None:
        return  # the forward fails at the weights' own size too: the meta device cannot judge this model
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    near = _sizes_that_run(spec, family, model, kwargs, target_geo.in_chans, target_geo.img_size)
    sizes = f"nearest sizes that run: {', '.join(str(list(s)) for s in near)}; " if near else ""
    if dynamic:
        raise SpecError(
            f"{spec.where}.img_size: timm's {family.name} model cannot run at the variant's own size "
            f"{list(target_geo.img_size)}: {first}; {sizes}pick another img_size"
        )
    raise SpecError(
        f"{spec.where}.img_size: dynamic: false builds timm's own {family.name} model at "
        f"{list(target_geo.img_size)}, which cannot run it: {first}; {sizes}"
        + ("or leave dynamic on" if family.supports_dynamic else "pick another img_size")
    )


def _target_feature_size(spec: VariantSpec, base_cfg: dict[str, Any], model: nn.Module, geometry: Geometry):
    """The variant's pool_size, where the base's cfg has one (spatial feature maps: the Swin families)."""
    if not base_cfg.get("pool_size"):
        return None
    try:
        return feature_size(model, geometry)
    except Exception as e:  # the base's own forward cannot take the size
        raise SpecError(
            f"{spec.where}.img_size: {spec.arch} cannot run at {list(geometry.img_size)} ({e}); pick another img_size"
        ) from e
