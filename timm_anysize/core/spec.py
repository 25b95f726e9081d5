"""Typed, frozen variant specs parsed from YAML mappings.

A :class:`VariantSpec` says what the *model* should be (base architecture, geometry, constructor args) and where
its *weights* come from (:class:`WeightSource`, which also declares the geometry the weights were trained at when
it differs from the base's). Parsing only checks what can be checked without timm; checks that need the base
architecture (does the patch divide the image?) live in :mod:`timm_anysize.validation`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional, Tuple, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from timm_anysize.core.compat import COMPAT_PRESETS
from timm_anysize.core.errors import SpecError

__all__ = [
    "VariantSpec",
    "WeightSource",
    "AdaptOptions",
    "PosEmbedOptions",
    "PatchEmbedOptions",
    "ChannelOptions",
    "DataOptions",
    "CardOptions",
    "FlexiOptions",
    "parse_variant",
    "format_spec_error",
    "as_pair",
]

# Sanity caps for single values; what a geometry costs in memory is checked against a budget in plan.py.
MAX_IMG_SIDE = 1_000_000
MAX_CHANS = 1024
# model_args are passed to timm constructors as they are; keep them small, plain data.
MAX_MODEL_ARGS_ITEMS = 1000
MAX_MODEL_ARGS_DEPTH = 8

Size2 = Tuple[int, int]


def as_pair(value: Any) -> tuple:
    """``(value, value)`` for an int, else ``tuple(value)``: the one spelling of "a size may be one int or (H, W)"
    (callers check the values; ``bool`` is an int here, as in Python).

    Example:
        >>> as_pair(16), as_pair([12, 8])
        ((16, 16), (12, 8))
    """
    return (value, value) if isinstance(value, int) else tuple(value)


_SizeIn = Union[StrictInt, Tuple[StrictInt, StrictInt]]
_Number = Union[StrictInt, float]
VARIANT_NAME_PATTERN = r"^[a-z][a-z0-9_]*$"
# Which model of a teacher/student checkpoint to load.
SELECT = ("teacher", "student")
# What pretrained.layout accepts: auto, timm, and the names timm_anysize.origins registers (each origin and each of
# its layouts), as timm's registry collects its models: the core never imports the origins.
_LAYOUT_NAMES: dict[str, None] = {"auto": None, "timm": None}


def register_layout_names(names: Any) -> None:
    """Add checkpoint layout names to what ``pretrained.layout`` accepts (called by :mod:`timm_anysize.origins`)."""
    _LAYOUT_NAMES.update(dict.fromkeys(names))


def layout_names() -> tuple[str, ...]:
    """The names ``pretrained.layout`` accepts, in registration order.

    Example:
        >>> import timm_anysize
        >>> layout_names()[:3]
        ('auto', 'timm', 'dino')
    """
    return tuple(_LAYOUT_NAMES)


def _check_layout(value: str) -> str:
    if value not in _LAYOUT_NAMES:
        raise ValueError(f"Input should be {', '.join(repr(n) for n in _LAYOUT_NAMES)}")
    return value


# A checkpoint layout name (validated against the registered names; the JSON schema lists them).
LayoutName = Annotated[
    StrictStr, AfterValidator(_check_layout), Field(json_schema_extra=lambda s: s.update(enum=list(_LAYOUT_NAMES)))
]
# Position-embedding compat presets (timm_anysize.core.compat): a Literal built from the presets at run time, which
# the type checker cannot read (it sees a str).
if TYPE_CHECKING:
    CompatName = str
else:
    CompatName = Literal[tuple(COMPAT_PRESETS)]


def _to_size2(value: Any, upper: int) -> Optional[Size2]:
    if value is None:
        return None
    pair = as_pair(value)
    for v in pair:
        if v < 1 or v > upper:
            raise ValueError(f"each side must be between 1 and {upper}, got {value!r}")
    return pair  # type: ignore[return-value]


# An image or patch size: an int or [H, W], validated and normalised to an (H, W) tuple (what the type checker sees:
# a validated field holds the pair).
if TYPE_CHECKING:
    SizeField = Size2
else:
    SizeField = Annotated[_SizeIn, AfterValidator(lambda v: _to_size2(v, MAX_IMG_SIDE))]


def _check_plain_data(value: Any) -> None:
    """model_args must be small JSON-like data (YAML aliases can build enormous shared structures)."""
    count = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > MAX_MODEL_ARGS_ITEMS or depth > MAX_MODEL_ARGS_DEPTH:
            raise ValueError(
                f"model_args is too large (over {MAX_MODEL_ARGS_ITEMS} values or {MAX_MODEL_ARGS_DEPTH} levels deep)"
            )
        if isinstance(item, dict):
            if not all(isinstance(k, str) for k in item):
                raise ValueError("model_args keys must be strings")
            stack += [(x, depth + 1) for x in item.values()]
        elif isinstance(item, (list, tuple)):
            stack += [(x, depth + 1) for x in item]
        elif not (item is None or isinstance(item, (bool, int, float, str))):
            raise ValueError(
                f"model_args values must be plain data (numbers, strings, lists), got {type(item).__name__}"
            )


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PosEmbedOptions(_Spec):
    """How an absolute position embedding is resampled to a new grid (prefix tokens are always kept aside)."""

    interpolation: Literal["bicubic", "bilinear", "nearest", "area"] = Field(
        default="bicubic", description="Interpolation of the grid (at load time and for run-time sizes)."
    )
    antialias: Optional[StrictBool] = Field(
        default=None, description="Anti-alias when downsampling; default true for bicubic/bilinear, false otherwise."
    )
    compat: CompatName = Field(
        default="timm",
        description="Resample token position embeddings exactly as this library does (at load time and for "
        "run-time sizes): timm, torchvision (align_corners), transformers, mmpretrain (no antialias), dino "
        "(scale_factor with +0.1 offset), big_vision (bilinear, align_corners). Other than timm, it replaces interpolation/antialias.",
    )

    @model_validator(mode="after")
    def _check_antialias(self) -> "PosEmbedOptions":
        if self.antialias and self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"antialias is only supported with bicubic or bilinear, not {self.interpolation!r}")
        clash = sorted({"interpolation", "antialias"} & self.model_fields_set)
        if self.compat != "timm" and clash:
            raise ValueError(f"compat {self.compat!r} fixes the interpolation; remove {' and '.join(clash)}")
        return self

    @property
    def use_antialias(self) -> bool:
        if self.compat != "timm":
            return COMPAT_PRESETS[self.compat].antialias
        if self.antialias is None:
            return self.interpolation in ("bicubic", "bilinear")
        return self.antialias


class PatchEmbedOptions(_Spec):
    """How the patch-embedding kernel is resized when the patch size changes."""

    method: Literal["pi", "interpolate"] = Field(
        default="pi",
        description="'pi': FlexiViT pseudo-inverse resize (keeps patch tokens of resized patches); "
        "'interpolate': plain interpolation of the kernel (the naive method, for comparison).",
    )
    interpolation: Literal["bicubic", "bilinear"] = Field(
        default="bicubic", description="Interpolation the resize inverts (FlexiViT used bilinear)."
    )
    antialias: StrictBool = Field(default=True, description="Anti-aliasing of that interpolation.")


class ChannelOptions(_Spec):
    """How the input-channel dimension of the patch kernel is adapted when ``in_chans`` changes."""

    method: Literal["timm", "map"] = Field(
        default="timm",
        description="'timm': timm.models.adapt_input_conv (1 channel sums RGB; more channels repeat and rescale); "
        "'map': take each target channel from the source channel named in `map` (null: zeros).",
    )
    map: Optional[Tuple[Optional[StrictInt], ...]] = Field(
        default=None, description="Source channel per target channel, null for zeros, e.g. [2, 1, 0] for BGR."
    )

    @model_validator(mode="after")
    def _check_map(self) -> "ChannelOptions":
        if self.method == "map" and not self.map:
            raise ValueError("method 'map' needs `map`: one source channel index (or null) per target channel")
        if self.method != "map" and self.map is not None:
            raise ValueError("`map` is only used with method: map")
        return self


class AdaptOptions(_Spec):
    """Adaptation options; the defaults are right for most checkpoints."""

    pos_embed: PosEmbedOptions = PosEmbedOptions()
    patch_embed: PatchEmbedOptions = PatchEmbedOptions()
    channels: ChannelOptions = ChannelOptions()
    drop_keys: Tuple[StrictStr, ...] = Field(
        default=(), description="Glob patterns of source keys deliberately left unused."
    )
    init_keys: Tuple[StrictStr, ...] = Field(
        default=(), description="Glob patterns of target keys deliberately left at their fresh initialisation."
    )


class WeightSource(_Spec):
    """Where the pretrained weights come from, and the geometry they were trained at.

    Without ``file``, ``hf_hub_id`` or ``url`` the base tag's own weight source is used. The geometry fields
    default to the base architecture's (and its pretrained cfg's); set them when the checkpoint was trained at
    another size, e.g. a non-square one.
    """

    tag: Optional[StrictStr] = Field(default=None, description="Pretrained tag the variant is registered with.")
    file: Optional[Path] = Field(default=None, description="Local .pth/.bin/.safetensors/.npz, relative to the YAML.")
    hf_hub_id: Optional[StrictStr] = Field(default=None, description="Hugging Face Hub repo of the weights.")
    filename: Optional[StrictStr] = Field(
        default=None, description="File in the Hub repo (default: model.safetensors, then pytorch_model.bin)."
    )
    revision: Optional[StrictStr] = Field(default=None, description="Hub revision (branch, tag or commit).")
    url: Optional[StrictStr] = Field(
        default=None,
        description="Weights URL (cached by URL in torch's hub folder; a name-<sha256 prefix>.ext file is checked).",
    )
    img_size: Optional[SizeField] = Field(
        default=None, description="Size the weights were trained at (default: base's)."
    )
    patch_size: Optional[SizeField] = Field(default=None, description="Patch size of the weights (default: base's).")
    in_chans: Optional[StrictInt] = Field(
        default=None, ge=1, le=MAX_CHANS, description="Input channels of the weights (default: base's)."
    )
    num_classes: Optional[StrictInt] = Field(
        default=None, ge=0, description="Classes of the weights' head (default: base's)."
    )
    layout: LayoutName = Field(  # type: ignore[valid-type]
        default="auto",
        description="Checkpoint layout: auto (detected from the keys), timm, a library (torchvision, transformers, "
        "mmpretrain, dino) or one of its layouts (e.g. torchvision.vit); other libraries' keys are mapped to timm's.",
    )
    select: Literal[SELECT] = Field(  # type: ignore[valid-type]
        default="teacher", description="Which model of a teacher/student (DINO) checkpoint to load."
    )
    model_args: dict[str, Any] = Field(
        default_factory=dict,
        description="timm.create_model kwargs the weights were built with where they differ from the variant's "
        "model_args (e.g. a Swin window_size: the variant's own window gets resized bias tables).",
    )

    @field_validator("model_args")
    @classmethod
    def _source_model_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        _check_plain_data(v)
        reserved = sorted(
            set(v)
            & {
                "img_size",
                "patch_size",
                "in_chans",
                "num_classes",
                "dynamic_img_size",
                "dynamic_img_pad",
                "features_only",
                "pretrained",
            }
        )
        if reserved:
            raise ValueError(
                f"set {', '.join(reserved)} directly under pretrained (or at the top level), not in "
                f"pretrained.model_args"
            )
        return v

    @field_validator("tag")
    @classmethod
    def _tag(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and (not v or "." in v or "/" in v):
            raise ValueError(f"a tag is a non-empty name without '.' or '/', got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_location(self) -> "WeightSource":
        given = [k for k in ("file", "hf_hub_id", "url") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one weight location, not {' and '.join(given)}")
        if (self.filename or self.revision) and not self.hf_hub_id:
            raise ValueError("`filename` and `revision` need `hf_hub_id`")
        return self

    @property
    def has_location(self) -> bool:
        return any(getattr(self, k) is not None for k in ("file", "hf_hub_id", "url"))


class DataOptions(_Spec):
    """Overrides of the data config (`timm.data.resolve_data_config`) of the variant."""

    mean: Optional[Tuple[_Number, ...]] = Field(
        default=None, description="Per-channel mean, 1 or in_chans entries (default: base's, adapted to in_chans)."
    )
    std: Optional[Tuple[_Number, ...]] = Field(default=None, description="Per-channel std, as mean.")
    crop_pct: Optional[_Number] = Field(default=None, gt=0, le=1, description="Center-crop fraction at eval.")
    crop_mode: Optional[Literal["center", "squash", "border"]] = Field(default=None, description="timm crop mode.")
    interpolation: Optional[Literal["bicubic", "bilinear", "nearest", "random", "lanczos"]] = Field(
        default=None, description="Image resize interpolation of the data pipeline."
    )

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: Optional[Tuple[float, ...]]) -> Optional[Tuple[float, ...]]:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError(f"every std must be > 0, got {list(v)}")
        return v


class CardOptions(_Spec):
    """Model-card metadata for exports."""

    description: Optional[StrictStr] = Field(default=None, description="One paragraph about the variant.")
    license: Optional[StrictStr] = Field(default=None, description="License id (default: the base's).")
    label_names: Optional[Tuple[StrictStr, ...]] = Field(default=None, description="Class names, one per class.")
    datasets: Tuple[StrictStr, ...] = Field(default=(), description="Datasets the weights were trained on.")
    tags: Tuple[StrictStr, ...] = Field(default=(), description="Extra Hub tags.")


class FlexiOptions(_Spec):
    """Run-time patch sizes in training (FlexiViT): each train-mode forward draws one (timm_anysize.flexi)."""

    patch_sizes: Tuple[SizeField, ...] = Field(
        min_length=1, description="Patch sizes drawn in train mode, one per forward (int or [H, W] each)."
    )
    weights: Optional[Tuple[Annotated[_Number, Field(ge=0)], ...]] = Field(
        default=None, description="Relative probability of each patch size (default: uniform)."
    )
    seed: StrictInt = Field(
        default=0, description="Seed of the draws; with the step count it fixes the size, the same on every DDP rank."
    )

    @model_validator(mode="after")
    def _check_weights(self) -> "FlexiOptions":
        if self.weights is not None:
            if len(self.weights) != len(self.patch_sizes):
                raise ValueError(
                    f"weights has {len(self.weights)} entries but patch_sizes has "
                    f"{len(self.patch_sizes)}; give one weight per patch size"
                )
            if not sum(self.weights) > 0:
                raise ValueError("weights are all zero; give at least one positive weight")
        return self


class VariantSpec(_Spec):
    """One variant: a timm base architecture at a new geometry, with its weight source and adaptation options.

    Example:
        >>> spec = parse_variant("vit_tiny_patch4_64", {"base": "vit_tiny_patch16_224", "img_size": 64,
        ...                                             "patch_size": 4, "in_chans": 1})
        >>> spec.img_size, spec.patch_size, spec.in_chans
        ((64, 64), (4, 4), 1)
    """

    name: StrictStr = Field(pattern=VARIANT_NAME_PATTERN)
    base: StrictStr = Field(description="timm architecture with optional pretrained tag: 'arch[.tag]'.")
    img_size: Optional[SizeField] = Field(default=None, description="Input size: int or [H, W].")
    patch_size: Optional[SizeField] = Field(default=None, description="Patch size: int or [H, W].")
    in_chans: Optional[StrictInt] = Field(default=None, ge=1, le=MAX_CHANS, description="Input channels.")
    num_classes: Optional[StrictInt] = Field(
        default=None, ge=0, description="Classes of the head; a new head is initialised when it differs."
    )
    model_args: dict[str, Any] = Field(default_factory=dict, description="Other timm.create_model kwargs.")
    dynamic: Optional[StrictBool] = Field(
        default=None,
        description="Accept any input H x W at run time (cached resampling); default: on where the family supports it.",
    )
    pad: StrictBool = Field(
        default=True, description="Pad inputs that are not a multiple of the patch; false: such inputs are an error."
    )
    flexi: Optional[FlexiOptions] = Field(
        default=None,
        description="Train at a patch size drawn per forward (FlexiViT); eval runs at patch_size (or the one set "
        "with timm_anysize.set_patch_size). Needs a family with a patch kernel and dynamic on.",
    )
    pretrained: WeightSource = WeightSource()
    adapt: AdaptOptions = AdaptOptions()
    data: DataOptions = DataOptions()
    card: CardOptions = CardOptions()
    origin: Optional[str] = Field(default=None, exclude=True, description="File the spec was read from.")

    @field_validator("model_args")
    @classmethod
    def _no_geometry_in_model_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        _check_plain_data(v)
        reserved = sorted(set(v) & {"img_size", "patch_size", "in_chans", "num_classes", "pretrained"})
        if reserved:
            raise ValueError(f"set {', '.join(reserved)} at the variant's top level, not in model_args")
        runtime = sorted(set(v) & {"dynamic_img_size", "dynamic_img_pad", "features_only"})
        if runtime:
            raise ValueError(f"{', '.join(runtime)} is set by timm-anysize; use `dynamic` / `pad` at the top level")
        return v

    @model_validator(mode="after")
    def _check(self) -> "VariantSpec":
        if self.img_size and self.patch_size:
            for side, (i, p) in zip(("height", "width"), zip(self.img_size, self.patch_size)):
                if i % p:
                    raise ValueError(
                        f"patch_size {list(self.patch_size)} must divide img_size {list(self.img_size)} "
                        f"({side} {i} is not a multiple of {p}); pick a multiple of the patch"
                    )
        if self.flexi is not None:
            if self.dynamic is False:
                raise ValueError("flexi needs the model to run at any grid; remove `dynamic: false`")
            if not self.pad and self.img_size:
                for flexi_p in self.flexi.patch_sizes:
                    if self.img_size[0] % flexi_p[0] or self.img_size[1] % flexi_p[1]:
                        raise ValueError(
                            f"flexi.patch_sizes: {list(flexi_p)} does not divide img_size {list(self.img_size)} and pad is "
                            f"false; drop it, pick a divisor, or set pad: true"
                        )
        ch = self.adapt.channels
        if ch.method == "map" and self.in_chans is not None and len(ch.map or ()) != self.in_chans:
            raise ValueError(f"adapt.channels.map has {len(ch.map or ())} entries but in_chans is {self.in_chans}")
        if self.data.mean is not None and self.in_chans and len(self.data.mean) not in (1, self.in_chans):
            raise ValueError(f"data.mean needs 1 or in_chans={self.in_chans} entries, got {len(self.data.mean)}")
        if self.data.std is not None and self.in_chans and len(self.data.std) not in (1, self.in_chans):
            raise ValueError(f"data.std needs 1 or in_chans={self.in_chans} entries, got {len(self.data.std)}")
        return self

    @property
    def arch(self) -> str:
        """The base architecture name without its tag."""
        return self.base.split(".", 1)[0]

    @property
    def base_tag(self) -> Optional[str]:
        """The base's pretrained tag, if one was given."""
        return self.base.split(".", 1)[1] if "." in self.base else None

    @property
    def where(self) -> str:
        """Where the spec comes from, for messages: ``configs/vit.yaml: vit_tiny_patch4_64``."""
        return f"{self.origin or '<dict>'}: {self.name}"

    def same_as(self, other: "VariantSpec") -> bool:
        """True when both specs describe the same variant (the file they came from is ignored)."""
        return self.model_dump() == other.model_dump()


def _allowed_keys(loc: Tuple[Any, ...]) -> list[str]:
    """The field names allowed at the parent of ``loc`` (a pydantic error location)."""
    model: Any = VariantSpec
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return [k for k in getattr(model, "model_fields", {}) if k not in ("name", "origin")]


def _fmt_value(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def format_spec_error(err: ValidationError, variant: str, origin: Optional[str]) -> str:
    """Turn a pydantic ValidationError into lines naming the file, the variant, the key and the bad value."""
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tuple["))))
        # pydantic names union branches in the location ('int', 'tuple[int,int]'); drop them for the user.
        loc = tuple(p for p in loc if p not in ("int", "float", "str", "bool"))
        key = ".".join(str(p) for p in loc)
        where = f"{variant}.{key}" if key else variant
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            choices = _allowed_keys(loc)
            close = difflib.get_close_matches(str(loc[-1]), choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            msg = f"unknown key{hint} (allowed: {', '.join(choices)})"
        elif e["type"] not in ("value_error", "assertion_error") and "input" in e:
            msg = f"{msg}, got {_fmt_value(e['input'])}"
        lines.append(f"{origin or '<dict>'}: {where}: {msg}")
    # The same mistake can be reported by several union branches; keep the first of each line.
    return "\n".join(dict.fromkeys(lines))


def parse_variant(name: str, data: Any, origin: Optional[str] = None) -> VariantSpec:
    """Validate one variant mapping and return its frozen spec.

    Relative ``pretrained.file`` paths resolve against the folder of ``origin`` (the YAML file).

    Args:
        name: Variant name, the model name it will be registered under.
        data: The mapping under the variant's name in the YAML ``variants:`` section.
        origin: The file the mapping came from, for error messages and relative paths.

    Returns:
        The validated spec.

    Raises:
        SpecError: On any invalid key or value; the message names the file, the variant and the key.

    Example:
        >>> parse_variant("my_vit", {"base": "vit_tiny_patch16_224", "img_size": [48, 64]}).img_size
        (48, 64)
    """
    if not isinstance(data, dict):
        raise SpecError(f"{origin or '<dict>'}: {name}: a variant is a mapping of keys, got {_fmt_value(data)}")
    if not isinstance(name, str):
        raise SpecError(f"{origin or '<dict>'}: {name!r}: a variant name is a string")
    try:
        spec = VariantSpec.model_validate({**data, "name": name, "origin": origin})
    except ValidationError as e:
        raise SpecError(format_spec_error(e, name, origin)) from None
    file = spec.pretrained.file
    if file is not None and origin and not file.is_absolute():
        file = (Path(origin).resolve().parent / file).resolve()
        spec = spec.model_copy(update={"pretrained": spec.pretrained.model_copy(update={"file": file})})
    return spec
