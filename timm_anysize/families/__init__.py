"""The supported families of timm models, one module each (like timm's own one-module-per-architecture layout).

Each module holds its family's :class:`~timm_anysize.family.Family` row(s) -- the geometry-dependent tensors, the
changes it cannot take, how it runs at any size -- next to its run-time code (dynamic subclasses, cached tables).
Adding a family is one new module here, named in ``_MODULES``, plus one row in tests/test_families.py's ``SETUP``.

Example:
    >>> import timm
    >>> family_of(timm.create_model("test_vit")).name
    'vit'
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from ..family import GEOMETRY_CHANGES, Family, classify_changes, tensor_layouts
from . import (
    beit, cait, convit, crossvit, deit, efficientformer, efficientformer_v2, eva, gcvit, gemma4_vit, hiera, levit,
    maxxvit, mlp_mixer, mvitv2, naflexvit, nest, pit, sam, swin, tnt, tresnet, twins, visformer, vit, volo, xcit,
)
from .generic import generic_family

__all__ = [
    "Family",
    "FAMILIES",
    "family_of",
    "generic_family",
    "GEOMETRY_CHANGES",
    "UNSUPPORTED",
    "classify_changes",
    "families_markdown",
    "tensor_layouts",
]

# The order is the lookup order of family_of (a ViT hybrid is told from a ViT by its row's ``matches``).
_MODULES = (vit, deit, eva, beit, cait, swin, pit, volo, levit, twins, xcit, hiera, mvitv2, crossvit, naflexvit,
            maxxvit, gcvit, sam, tnt, convit, efficientformer, efficientformer_v2, nest, mlp_mixer, gemma4_vit,
            tresnet, visformer)

FAMILIES: tuple[Family, ...] = tuple(row for module in _MODULES for row in module.FAMILIES)


def family_of(model: nn.Module) -> Optional[Family]:
    """The family row for a model instance (or a dynamic subclass of one), or None if not supported."""
    cls = type(model)
    # Exact classes first: timm's DeiT-distilled class is a direct subclass of the ViT class, and must not be taken
    # for a ViT; a direct subclass (made by timm-anysize or a user) is looked up after.
    for exact in (True, False):
        for fam in FAMILIES:
            dynamic = fam.runtime.classes.values() if fam.runtime is not None else ()
            hit = (any(cls is c for c in fam.classes) or cls in dynamic) if exact else \
                any(cls.__bases__ == (c,) for c in fam.classes)
            if hit and (fam.matches is None or fam.matches(model)):
                return fam
    return None


# (family, change) -> why the architecture cannot take it. Checked when a spec is validated, before any weights are
# read (or built at the target geometry).
UNSUPPORTED: dict[tuple[str, str], str] = {
    (fam.name, change): reason for fam in FAMILIES for change, reason in fam.unsupported.items()
}


def _survey_lines(survey: dict) -> list[str]:
    """The survey of every timm module (timm_anysize/survey.json), with counts first."""
    changes = list(GEOMETRY_CHANGES)
    mods = survey["modules"]
    short = {"yes": "yes", "declared": "declared", "refused": "refused", "error": "error"}

    def label(cell: str) -> str:
        return short.get(cell.split(":")[0], cell)

    def loads(r: dict, which) -> bool:
        return all(r["cells"][c] == "yes" for c in which)

    non_patch = [c for c in changes if not c.startswith("patch")]
    n_models = sum(r["models"] for r in mods.values())
    counts = [
        f"- **{len(mods)}** modules of timm {survey['timm_version']} ({n_models} models), one example each;",
        f"- **{sum(r['family'] not in ('', 'generic') for r in mods.values())}** have a family row, "
        f"**{sum(r['family'] == 'generic' for r in mods.values())}** go through the generic path;",
        f"- **{sum(loads(r, non_patch) for r in mods.values())}** take every img_size and in_chans change, "
        f"**{sum(loads(r, changes) for r in mods.values())}** every change incl. patch_size;",
        f"- **{sum(loads(r, ['in_chans_1', 'in_chans_4']) for r in mods.values())}** take in_chans changes;",
        f"- **{sum(r['any_size'] == 'yes' for r in mods.values())}** run at any input size;",
        f"- **{sum(any(label(v) == 'refused' for v in r['cells'].values()) for r in mods.values())}** have "
        f"geometry-bound tensors no row resamples yet (refused by name), "
        f"**{sum(any(label(v) == 'error' for v in (*r['cells'].values(), r['any_size'])) for r in mods.values())}** "
        f"an error (see the why column).",
    ]
    lines = [
        "## Every timm module",
        "",
        "Computed by `timm_anysize.survey` (not written by hand): each module's example is resolved by `make_plan` for",
        "every change (meta device, no weights) and its default variant runs on the meta device at two other sizes.",
        "`yes`: loads (or runs); `declared`: the family's reason, given when the spec is validated; `refused`: a",
        "tensor whose shape the geometry changes and that no row resamples, named when the spec is validated;",
        "`error`: timm cannot build it or the forward fails. Families with a row are tested cell by cell below.",
        "",
        *counts,
        "",
        "| module | models | example | family | " + " | ".join(changes) + " | any size | why not |",
        "|---|---|---|---|" + "---|" * len(changes) + "---|---|",
    ]
    for module, r in sorted(mods.items()):
        cells = [*(r["cells"][c] for c in changes), r["any_size"]]
        why = []
        for cell in cells:
            reason = cell.split(": ", 1)[1] if ": " in cell else ""
            if reason and reason not in why:
                why.append(reason)
        text = "; ".join(why).replace("|", "\\|")
        text = text if len(text) <= 240 else text[:237] + "..."
        lines.append(f"| {module} | {r['models']} | `{r['example']}` | {r['family'] or '-'} | "
                     + " | ".join(label(c) for c in cells) + f" | {text} |")
    return lines + [""]


def families_markdown() -> str:
    """docs/families.md: the survey of every timm module (timm_anysize/survey.json) and the tested coverage matrix
    of the family rows (a test keeps the file in sync).

    Example:
        >>> families_markdown().startswith("# Family coverage")
        True
    """
    from ..survey import SURVEY_FILE, load_survey

    changes = list(GEOMETRY_CHANGES)
    lines = [
        "# Family coverage",
        "",
        "<!-- generated by `timm-anysize families`; do not edit by hand -->",
        "",
    ]
    if SURVEY_FILE.exists():
        lines += _survey_lines(load_survey())
    lines += [
        "## Family rows",
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
        "| family | module | timm classes | example | " + " | ".join(changes)
        + " | any size at run time | features_only | export (dynamic H x W) |",
        "|---|---|---|---|" + "---|" * len(changes) + "---|---|---|",
    ]
    homes = {fam.name: module.__name__.rsplit(".", 1)[-1] for module in _MODULES for fam in module.FAMILIES}
    for fam in FAMILIES:
        cells = [UNSUPPORTED.get((fam.name, c), "yes") for c in changes]
        dyn = {"cached": "yes (cached)", "native": "yes (timm's own)"}.get(fam.dynamic, f"no: {fam.dynamic_reason}")
        if fam.whole_patches:
            dyn += ", sizes its stem divides (not padded)"
        for reason in dict.fromkeys(fam.static_unsupported.values()):  # the sizes only the dynamic path runs
            changed = "/".join(f"`{c}`" for c, r in fam.static_unsupported.items() if r == reason)
            dyn += f"; `dynamic: false` refused for {changed}: {reason}"
        classes = ", ".join(c.__name__ for c in fam.classes)
        feats = "any size" if fam.dynamic_features else "the variant's size"
        export = (f"no: {fam.export_note}" if fam.export_note
                  else f"torch.export yes; ONNX no: {fam.onnx_note}" if fam.onnx_note else "yes")
        lines.append(f"| {fam.name} | `families/{homes[fam.name]}.py` | {classes} | `{fam.example}` | "
                     + " | ".join(cells) + f" | {dyn} | {feats} | {export} |")
    lines += ["", "Changes: " + "; ".join(f"`{k}`: {v}" for k, v in GEOMETRY_CHANGES.items()) + ".", ""]
    return "\n".join(lines) + "\n"
