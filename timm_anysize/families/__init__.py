"""The supported families of timm models, one module each (like timm's own one-module-per-architecture layout).

Each module holds its family's :class:`~timm_anysize.core.family.Family` row(s) -- the geometry-dependent tensors, the
changes it cannot take, how it runs at any size, the tiny model it is tested at -- next to its run-time code (dynamic
subclasses, cached tables). The modules are discovered: adding a family is one new module here (see CONTRIBUTING.md);
the tests, timm's conformance variants and docs/families.md are derived from the rows.

Example:
    >>> import timm
    >>> family_of(timm.create_model("test_vit")).name
    'vit'
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Optional

import torch.nn as nn

from timm_anysize.core.family import Family
from timm_anysize.families._generic import generic_family

__all__ = ["FAMILIES", "FAMILY_MODULES", "family_of", "generic_family", "UNSUPPORTED"]


def _family_modules() -> tuple[ModuleType, ...]:
    """Every module of this package that declares ``FAMILIES``, in name order (``_*`` modules are shared code)."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    modules = [importlib.import_module(f"{__name__}.{name}") for name in names]
    return tuple(m for m in modules if hasattr(m, "FAMILIES"))


# Discovered, in module-name order; a module's rows keep their own order. That is the lookup order of family_of,
# which matters only between rows of one class: they live in one module and are told apart by ``matches`` (a ViT
# hybrid from a ViT); tests/test_families.py checks that rows of different modules never share a class.
FAMILY_MODULES = _family_modules()

FAMILIES: tuple[Family, ...] = tuple(row for module in FAMILY_MODULES for row in module.FAMILIES)


def family_of(model: nn.Module) -> Optional[Family]:
    """The family row for a model instance (or a dynamic subclass of one), or None if not supported."""
    cls = type(model)
    # Exact classes first: timm's DeiT-distilled class is a direct subclass of the ViT class, and must not be taken
    # for a ViT; a direct subclass (made by timm-anysize or a user) is looked up after.
    for exact in (True, False):
        for fam in FAMILIES:
            dynamic = fam.runtime.classes.values() if fam.runtime is not None else ()
            hit = (
                (any(cls is c for c in fam.classes) or cls in dynamic)
                if exact
                else any(cls.__bases__ == (c,) for c in fam.classes)
            )
            if hit and (fam.matches is None or fam.matches(model)):
                return fam
    return None


# (family, change) -> why the architecture cannot take it. Checked when a spec is validated, before any weights are
# read (or built at the target geometry).
UNSUPPORTED: dict[tuple[str, str], str] = {
    (fam.name, change): reason for fam in FAMILIES for change, reason in fam.unsupported.items()
}
