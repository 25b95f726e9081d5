"""The plan a variant model was built from, kept on the model: the builder keeps it, export (hub), flexi, NaFlex and
calibration read it back. One typed home for the attribute (torch types ``nn.Module.__getattr__`` as
``Tensor | Module``, so a plan read off a model by attribute is untyped).
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from timm_anysize.core.errors import UnsupportedModelError
from timm_anysize.core.variant_plan import VariantPlan

__all__ = ["keep_plan", "plan_of", "variant_plan"]


def keep_plan(model: nn.Module, plan: VariantPlan) -> None:
    """Keep on ``model`` the plan it was built from (what export needs: base arch, model args, geometries)."""
    setattr(model, "_anysize_plan", plan)


def plan_of(model: nn.Module) -> Optional[VariantPlan]:
    """The plan ``model`` was built from, None for a model timm-anysize did not build.

    Example:
        >>> import timm
        >>> plan_of(timm.create_model("vit_tiny_patch4_64")).spec.name, plan_of(timm.create_model("test_vit"))
        ('vit_tiny_patch4_64', None)
    """
    plan = getattr(model, "_anysize_plan", None)
    return plan if isinstance(plan, VariantPlan) else None


def variant_plan(model: nn.Module) -> VariantPlan:
    """The plan ``model`` was built from; an :class:`UnsupportedModelError` for a model timm-anysize did not build.

    Example:
        >>> import timm
        >>> variant_plan(timm.create_model("test_vit"))
        Traceback (most recent call last):
        timm_anysize.core.errors.UnsupportedModelError: VisionTransformer was not built by timm-anysize; create it with timm.create_model(<variant name>)
    """
    plan = plan_of(model)
    if plan is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} was not built by timm-anysize; create it with timm.create_model(<variant name>)"
        )
    return plan
