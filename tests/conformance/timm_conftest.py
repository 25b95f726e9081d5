"""pytest plugin that runs timm's own ``tests/test_models.py`` on timm-anysize variants.

tests/test_timm_conformance.py copies this file beside timm's ``test_models.py`` (taken from the sdist of the
installed timm) and runs pytest there in a subprocess, with tests/anysize_tiny_models.py beside it. It imports that
(the rows' smaller entrypoints, ``TinyModel.base``) and ``timm_anysize`` before timm's file is collected, so the
variants (the shipped configs and ``$TIMM_ANYSIZE_CONFIGS``) are in timm's registry when timm's module-level
``list_models(...)`` calls build the parametrizations.

Each variant gets exactly the tests timm runs for its base: timm selects models by name and module
(``EXCLUDE_*_FILTERS``, ``NON_STD_FILTERS``, ``FEAT_INTER_FILTERS``), and a variant's name and module say nothing
about its architecture. So, for every test parametrized over timm's registry, the ``model_name`` list timm built is
read back and a variant is put in it exactly where its base architecture is (for a smaller entrypoint, the row's
``example``); the variant's own name is never
matched against timm's filters. Tests over a hand-picked list of named models (regressions that hard-code those
models' sizes) are deselected, as are the tests that download pretrained weights (the suite is offline).

Environment:
    TIMM_ANYSIZE_CONFORMANCE_MODELS: ``variants`` (default): every registered variant; ``bases``: instead, the base
        architectures of those variants, as plain timm models (the reference counts in docs/conformance.md).
    TIMM_ANYSIZE_CONFORMANCE_ONLY: comma-separated variant names to restrict the run to (default: all).
    TIMM_ANYSIZE_CONFORMANCE_CHUNK: ``i/n``: only every n-th of those variants (in name order), from the i-th (0-based):
        the suite runs the variants in n chunks, spread over its parallel workers.
    TIMM_ANYSIZE_CONFORMANCE_REPORT: a JSON file to write every cell's outcome to.
    TIMM_ANYSIZE_CONFORMANCE_CFGS_ONLY: comma-separated variant names that get only timm's pretrained-cfg tests
        (``test_model_default_cfgs*``): the suite's choice for the full-size shipped variants, whose architectures'
        other tests run on the families' tiny conformance variants.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import anysize_tiny_models  # noqa: F401  (copied beside this file: the rows' TinyModel.base entrypoints)
import pytest
import timm

import timm_anysize
from timm_anysize.families import FAMILIES, family_of, generic_family
from timm_anysize.plan import make_plan

# A parametrization over timm's registry lists hundreds of names; the hand-picked ones list a few dozen at most.
_REGISTRY_LIST_MIN = 100
# Registry-driven tests that create models with pretrained=True (Hub downloads); the suite is offline.
_NEEDS_WEIGHTS = {
    "test_model_load_pretrained": "downloads pretrained weights",
    "test_model_features_pretrained": "downloads pretrained weights",
}

_MODE = os.environ.get("TIMM_ANYSIZE_CONFORMANCE_MODELS", "variants")
_ONLY = [n for n in os.environ.get("TIMM_ANYSIZE_CONFORMANCE_ONLY", "").split(",") if n]
_CFGS_ONLY = set(filter(None, os.environ.get("TIMM_ANYSIZE_CONFORMANCE_CFGS_ONLY", "").split(",")))
_CFG_TESTS = {"test_model_default_cfgs", "test_model_default_cfgs_non_std"}
_CHUNK, _CHUNKS = (int(x) for x in (os.environ.get("TIMM_ANYSIZE_CONFORMANCE_CHUNK") or "0/1").split("/"))
_registry_tests: set[str] = set()
_cells: list[dict[str, Any]] = []
_models: dict[str, str] = {}  # node id -> model name


def _variants() -> list[str]:
    names = timm.list_models(module="variants")
    return [n for n in names if not _ONLY or n in _ONLY][_CHUNK::_CHUNKS]


def _arch(name: str) -> str:
    return name.split(".", 1)[0]


# A row's smaller entrypoint (tests/anysize_tiny_models.py) stands for its example: timm's filters select the tests of
# the example's name, and the plain-timm reference run builds the example.
_AS_EXAMPLE = {f.tiny.base: f.example for f in FAMILIES if f.tiny.base}


def _timm_name(base: str) -> str:
    return _AS_EXAMPLE.get(base, base)


_BASES = {v: timm_anysize.get_variant(v).arch for v in _variants()}
# Planned before timm's module collects: a cell reads the registered cfg (min_input_size, pool_size) by name,
# before or after the cell that creates the model first, and must see the same cfg either way.
for _variant in _BASES:
    timm_anysize.validate_variant(_variant)


def _family(arch: str) -> str:
    """The family of a variant or of a plain timm model (built on the meta device: shapes only)."""
    if arch in _BASES:
        return make_plan(timm_anysize.get_variant(arch)).family.name
    import torch

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    fam = family_of(model) or generic_family(model)  # no row: named by its timm module, as a variant's plan does
    return fam.name


def _selected(names: list[str]) -> list[str]:
    """The model names a registry-driven test runs here, in timm's own format (tagged or not)."""
    archs = {_arch(n) for n in names}
    tagged = any("." in n for n in names)
    out: list[str] = []
    if _MODE == "bases":
        for base in dict.fromkeys(_timm_name(b) for b in _BASES.values()):
            out += [n for n in names if _arch(n) == base][:1]  # the default tag only
        return out
    for variant, base in _BASES.items():
        if _timm_name(base) in archs:
            out += timm.list_models(variant, include_tags=True)[:1] if tagged else [variant]
    return out


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Rewrite each registry-driven ``model_name`` list before pytest parametrizes with it."""
    markers = metafunc.definition.own_markers
    for i, mark in enumerate(markers):
        if mark.name != "parametrize" or mark.args[0] != "model_name":
            continue
        names = list(mark.args[1])
        if len(names) < _REGISTRY_LIST_MIN:
            return
        _registry_tests.add(metafunc.function.__name__)
        markers[i] = pytest.mark.parametrize("model_name", _selected(names), *mark.args[2:], **mark.kwargs).mark


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        name = getattr(item, "originalname", item.name)
        params = getattr(getattr(item, "callspec", None), "params", {})
        # An empty selection parametrizes with pytest's NOTSET placeholder (a skip): not a model, not a cell.
        ok = name in _registry_tests and name not in _NEEDS_WEIGHTS and isinstance(params.get("model_name"), str)
        ok = ok and (name in _CFG_TESTS or _arch(str(params["model_name"])) not in _CFGS_ONLY)
        (keep if ok else drop).append(item)
        if ok:
            _models[item.nodeid] = params["model_name"]
    items[:] = keep
    config.hook.pytest_deselected(items=drop)


def _message(report: pytest.TestReport) -> Optional[str]:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:  # the first line that says something (TorchScript's errors start with a blank line)
        lines = [
            ln.strip() for ln in (crash.message or "").splitlines() if ln.strip() and ln.strip() != "RuntimeError:"
        ]
        return " ".join(lines[:2])[:300] or None
    if isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
        return str(report.longrepr[2])
    return str(report.longrepr).splitlines()[-1][:300] if report.longrepr else None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call" and not (report.failed or report.skipped):
        return
    test = report.nodeid.split("::")[-1].partition("[")[0]
    model = _models.get(report.nodeid, "")
    _cells.append(
        dict(
            test=test,
            model=model,
            arch=_arch(model),
            outcome=report.outcome,
            when=report.when,
            seconds=round(report.duration, 2),
            message=None if report.passed else _message(report),
        )
    )


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("TIMM_ANYSIZE_CONFORMANCE_REPORT")
    if not path:
        return
    families = {arch: _family(arch) for arch in {c["arch"] for c in _cells}}
    for cell in _cells:
        cell["family"] = families[cell["arch"]]
    with open(path, "w") as f:
        json.dump(dict(mode=_MODE, timm=timm.__version__, variants=list(_BASES), cells=_cells), f, indent=1)
