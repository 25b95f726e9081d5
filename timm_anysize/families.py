"""The table of supported model families: what in each family depends on geometry, and how timm normalises its
checkpoints. Adding a family is one row here plus one row of tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch.nn as nn
from timm.models import beit, cait, deit, eva, vision_transformer

from .spec import Size2

__all__ = ["Family", "FAMILIES", "family_of", "GEOMETRY_CHANGES", "UNSUPPORTED", "classify_changes",
           "families_markdown"]

CheckpointFilter = Callable[[dict, nn.Module], dict]


@dataclass(frozen=True)
class Family:
    """Geometry-dependent parts of one family of timm models.

    Attributes:
        name: Short family name used in messages and reports.
        classes: Model classes of the family (exact types, not subclasses).
        checkpoint_filter: timm's own filter that normalises foreign checkpoint layouts (applied with a model at the
            *source* geometry, so it renames and reshapes but never resamples).
        pos_embed_key: State-dict key of the absolute position embedding laid out on the patch grid.
        pos_embed_prefix: Entries of the position embedding that belong to prefix tokens, when the model's
            attributes do not say it (CaiT's class token joins after the patch stage: 0); None: derive it.
        rel_pos_tables: Glob patterns of relative-position bias tables whose window is the patch grid.
        supports_dynamic: Whether :func:`timm_anysize.enable_dynamic` can make the family run at any input size.
        dynamic_reason: Why not, when it cannot (shown in validation errors and docs/families.md).
    """

    name: str
    classes: tuple[type, ...]
    checkpoint_filter: Optional[CheckpointFilter]
    pos_embed_key: str = "pos_embed"
    pos_embed_prefix: Optional[int] = None
    rel_pos_tables: tuple[str, ...] = ()
    supports_dynamic: bool = True
    dynamic_reason: str = ""
    example: str = ""

    def grid_size(self, model: nn.Module) -> Size2:
        """The patch grid (H, W) the model was built for."""
        return tuple(model.patch_embed.grid_size)  # type: ignore[return-value]

    def patch_size(self, model: nn.Module) -> Size2:
        """The patch size (H, W) of the model's patch embedding."""
        return tuple(model.patch_embed.patch_size)  # type: ignore[return-value]

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """Tokens before the patch tokens (class, distillation, registers)."""
        default = 1 if getattr(model, "cls_token", None) is not None else 0
        return int(getattr(model, "num_prefix_tokens", default))

    def pos_embed_prefix_tokens(self, model: nn.Module) -> int:
        """How many leading entries of the position embedding belong to prefix tokens (kept aside on resample)."""
        if self.pos_embed_prefix is not None:
            return self.pos_embed_prefix
        if getattr(model, "no_embed_class", False):
            return 0
        return self.num_prefix_tokens(model)


FAMILIES: tuple[Family, ...] = (
    Family(
        name="vit",
        classes=(vision_transformer.VisionTransformer,),
        # adapt_layer_scale maps original DeiT-3 'gamma_N' keys; no timm-format key contains 'gamma_'.
        checkpoint_filter=partial(vision_transformer.checkpoint_filter_fn, adapt_layer_scale=True),
        example="test_vit",
    ),
    Family(
        name="deit_distilled",
        classes=(deit.VisionTransformerDistilled,),
        checkpoint_filter=vision_transformer.checkpoint_filter_fn,
        example="deit_tiny_distilled_patch16_224",
    ),
    Family(name="eva", classes=(eva.Eva,), checkpoint_filter=eva.checkpoint_filter_fn, example="eva02_tiny_patch14_224"),
    Family(
        name="beit",
        classes=(beit.Beit,),
        checkpoint_filter=beit.checkpoint_filter_fn,
        rel_pos_tables=("*relative_position_bias_table",),
        supports_dynamic=False,
        dynamic_reason="its relative-position bias tables are built for one window; per-size tables are not "
        "implemented yet",
        example="beit_base_patch16_224",
    ),
    Family(
        name="cait",
        classes=(cait.Cait,),
        checkpoint_filter=cait.checkpoint_filter_fn,
        pos_embed_prefix=0,
        supports_dynamic=False,
        dynamic_reason="timm's CaiT has no dynamic-size path (its patch embedding asserts the input size); not "
        "implemented yet",
        example="cait_xxs24_224",
    ),
)


def family_of(model: nn.Module) -> Optional[Family]:
    """The family row for a model instance (or a dynamic subclass of one), or None if not supported."""
    for fam in FAMILIES:
        if any(type(model) is c or type(model).__bases__ == (c,) for c in fam.classes):
            return fam
    return None


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
# read. Empty today: every supported family takes every change; a family that cannot adds its cells here.
UNSUPPORTED: dict[tuple[str, str], str] = {}


def classify_changes(source, target) -> list[str]:
    """The GEOMETRY_CHANGES a source -> target geometry makes (``source``/``target`` are plan Geometries)."""
    out = []
    if target.img_size != source.img_size:
        out.append("img_non_square" if target.img_size[0] != target.img_size[1] else "img_larger")
    if target.patch_size != source.patch_size:
        out.append("patch_smaller" if target.patch_size[0] < source.patch_size[0] else "patch_larger")
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
        "Each cell is tested by `tests/test_families.py` on the family's example model (shrunk to `embed_dim=64`):",
        "the weights load with every tensor accounted for (no tensor left at its fresh init), outputs are finite and",
        "of the right shape at the variant's size and, for dynamic families, at two other sizes (one non-square), and",
        "the same geometry is bit-identical to the base. A cell marked with a reason is rejected when the spec is",
        "validated, before any weights are read.",
        "",
        "| family | timm classes | example | " + " | ".join(changes) + " | any size at run time |",
        "|---|---|---|" + "---|" * len(changes) + "---|",
    ]
    for fam in FAMILIES:
        cells = [UNSUPPORTED.get((fam.name, c), "yes") for c in changes]
        dyn = "yes (cached)" if fam.supports_dynamic else f"no: {fam.dynamic_reason}"
        classes = ", ".join(c.__name__ for c in fam.classes)
        lines.append(f"| {fam.name} | {classes} | `{fam.example}` | " + " | ".join(cells) + f" | {dyn} |")
    lines += ["", "Changes: " + "; ".join(f"`{k}`: {v}" for k, v in GEOMETRY_CHANGES.items()) + ".", ""]
    lines += [
        "Not yet covered (rejected at validation as an unsupported family): Swin, SwinV2, SwinV2-CR, PiT, Hiera,",
        "CrossViT, VOLO, LeViT, MViTv2, NaFlexViT, Twins, XCiT, ViTamin.",
    ]
    return "\n".join(lines) + "\n"
