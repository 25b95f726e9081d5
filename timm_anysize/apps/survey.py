"""The survey of every timm.models module: which geometry changes each architecture takes, computed by running.

For each module of ``timm.list_modules()`` an example model (its smallest-named one) is resolved by
:func:`timm_anysize.plan.make_plan` for every change of :data:`~timm_anysize.families.GEOMETRY_CHANGES` (meta
device: shapes only, no weights) and its default variant is run on the meta device at two other input sizes. The
results are kept in ``survey.json`` next to this module (``timm-anysize families --refresh`` recomputes it); the test
suite recomputes a sample and checks the file covers every module of the installed timm.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import timm
import torch

from timm_anysize.builder import build_variant
from timm_anysize.core.errors import AdaptationError, AnysizeError, SpecError
from timm_anysize.core.family import GEOMETRY_CHANGES
from timm_anysize.core.meta import meta_device
from timm_anysize.core.spec import parse_variant
from timm_anysize.plan import make_plan

__all__ = ["SURVEY_FILE", "example_model", "survey_module", "run_survey", "load_survey"]

SURVEY_FILE = Path(__file__).with_name("survey.json")

# Name fragments of small models, smallest first: the example of a module is its first model by this rank.
_SMALL = (
    "test_",
    "atto",
    "femto",
    "pico",
    "nano",
    "xxs",
    "tiny",
    "xs",
    "mini",
    "small",
    "s0",
    "b0",
    "t0",
    "a0",
    "_t",
    "_s",
    "18",
    "_0",
    "lite",
)


def example_model(module: str) -> str:
    """The model of a timm module the survey uses: the first by name among its smallest-named ones.

    Example:
        >>> example_model("resnet")
        'test_resnet'
    """
    names = timm.list_models(module=module)
    if not names:
        raise ValueError(f"timm module {module!r} has no models")

    def rank(name: str) -> tuple[int, int, str]:
        hit = next((i for i, frag in enumerate(_SMALL) if frag in name), len(_SMALL))
        return hit, len(name), name

    return min(names, key=rank)


def _short(e: Union[BaseException, str], limit: int = 160) -> str:
    text = str(e).split("\n")[0]
    text = re.sub(r"^<dict>: \S+: ", "", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _spec(example: str, **changes: Any):
    return parse_variant("survey_variant", {"base": example, **changes})


def _cell(example: str, changes: dict[str, Any]) -> str:
    """'yes', or why not: 'declared: ...' (a family's reason, at validation), 'refused: ...' (a geometry-bound
    tensor named), 'error: ...' (timm cannot build it)."""

    try:
        make_plan(_spec(example, **changes))
        return "yes"
    except SpecError as e:
        declared = re.search(r"family cannot (?:take \w+|run at any input size): (.*)", str(e))
        return f"declared: {_short(declared.group(1))}" if declared else f"error: {_short(e)}"
    except AdaptationError as e:
        keys = re.search(r"geometry \([^)]*\): (.*?) \(", str(e))
        return f"refused: {keys.group(1) if keys else _short(e)}"


def _change_kwargs(change: str, size: tuple[int, int], patch: Optional[tuple[int, int]]) -> dict[str, Any]:
    step = 2 * patch[0] if patch else 32
    (h, w) = size
    if change.startswith("patch"):
        if patch is None:
            return {"patch_size": 8}
        big = h if h % (2 * patch[0]) == 0 and w % (2 * patch[1]) == 0 else 2 * h
        return (
            {"patch_size": patch[0] // 2, "img_size": [h, w]}
            if change == "patch_smaller"
            else {"patch_size": 2 * patch[0], "img_size": [big, big]}
        )
    by_change: dict[str, dict[str, Any]] = {
        "img_larger": {"img_size": [h + step, w + step]},
        "img_non_square": {"img_size": [h + step, w]},
        "in_chans_1": {"in_chans": 1},
        "in_chans_4": {"in_chans": 4},
    }
    return by_change[change]


def _runs_at_any_size(example: str, plan) -> str:
    """Run the default variant (meta device, shapes only) at two sizes other than its own."""

    if not plan.dynamic:
        return f"declared: {plan.family.dynamic_reason}"
    (h, w), c = plan.target.img_size, plan.target.in_chans
    step = 2 * plan.target.patch_size[0] if plan.target.patch_size else 32
    try:
        with meta_device(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_variant(plan.spec).eval()
            for hw in ((h + step, w), (h, w + 2 * step)):
                out = model(torch.empty(1, c, *hw))  # a model without a head gives its pooled features
                if (
                    out.ndim != 2
                    or out.shape[0] != 1
                    or (plan.target.num_classes and out.shape[1] != plan.target.num_classes)
                ):
                    return f"error: output {tuple(out.shape)} at {hw}"
    except Exception as e:  # whatever the forward raises is what the survey reports
        return f"error: {type(e).__name__}: {_short(e)}"
    return "yes"


def survey_module(module: str) -> dict[str, Any]:
    """Survey one timm module: its example, its family, each geometry change, and whether it runs at any size.

    Example:
        >>> r = survey_module("resnet")
        >>> r["family"], r["cells"]["in_chans_1"], r["cells"]["patch_smaller"].split(":")[0], r["any_size"]
        ('generic', 'yes', 'declared', 'yes')
    """

    example = example_model(module)
    out: dict[str, Any] = {"example": example, "models": len(timm.list_models(module=module))}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = make_plan(_spec(example))
    except AnysizeError as e:
        return {
            **out,
            "family": "",
            "cells": {c: f"error: {_short(e)}" for c in GEOMETRY_CHANGES},
            "any_size": "error: the base itself does not build",
        }
    out["family"] = "generic" if plan.family.generic else plan.family.name
    patch = plan.source.patch_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["cells"] = {c: _cell(example, _change_kwargs(c, plan.source.img_size, patch)) for c in GEOMETRY_CHANGES}
    out["any_size"] = _runs_at_any_size(example, plan)
    return out


def run_survey(modules: Optional[list[str]] = None, path: Optional[Path] = SURVEY_FILE, log=print) -> dict:
    """Survey ``modules`` (default: every timm module) and write the result to ``path`` (None: do not write)."""
    results = {}
    # timm lists timm_anysize.variants (where our variants register) among its modules: not an architecture.
    for module in modules or [m for m in timm.list_modules() if m != "variants"]:
        results[module] = survey_module(module)
        if log:
            log(f"{module}: {results[module]['family']} {results[module]['any_size'][:40]}")
    data = {"timm_version": timm.__version__, "modules": results}
    if path is not None:
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data


def load_survey(path: Path = SURVEY_FILE) -> dict:
    """The stored survey (``{"timm_version": ..., "modules": {module: result}}``)."""
    return json.loads(path.read_text())
