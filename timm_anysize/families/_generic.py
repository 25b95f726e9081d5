"""The family of any timm architecture without a module here (most CNNs): adapted generically.

Not a row of :data:`timm_anysize.families.FAMILIES` (so a ``_`` module, as shared code): :func:`generic_family` makes
one for the model at hand; :mod:`timm_anysize.families` exports it.
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from timm_anysize.core.family import Family, no_patch_change

__all__ = ["generic_family"]


def _timm_module(cls: type) -> str:
    """The timm.models module a model class lives in (``resnet``, ``convnext``...), its family's name."""
    return cls.__module__.rsplit(".", 1)[-1]


def generic_family(model: nn.Module, base_cfg: Optional[dict] = None) -> Family:
    """The family of a model with no row in :data:`FAMILIES`: any timm architecture, adapted generically.

    Same-shape tensors are copied, the first layer(s) named by the pretrained cfg's ``first_conv`` have their input
    channels adapted and the ``classifier`` is replaced on a new ``num_classes``; any other tensor whose shape
    changes with the geometry is refused by name (plan.py). No patch kernel is resized (``patch_size`` changes are
    refused). It runs at any input size where timm's own cfg says the architecture takes any size
    (``fixed_input_size`` false: convolutions and global pooling, as most CNNs).

    Example:
        >>> import timm
        >>> fam = generic_family(timm.create_model("test_resnet"))
        >>> fam.name, fam.dynamic, fam.changes_patch
        ('resnet', 'native', False)
    """
    cfg = dict(base_cfg or getattr(model, "pretrained_cfg", None) or {})
    cls = type(model)
    first = cfg.get("first_conv") or "its first layer"
    first = ", ".join(first) if isinstance(first, (tuple, list)) else first
    fixed = bool(cfg.get("fixed_input_size", False))
    return Family(
        name=_timm_module(cls),
        classes=(cls,),
        tensors=(),
        patch_embeds=(),
        dynamic="" if fixed else "native",
        dynamic_args=(),
        dynamic_reason=(
            f"timm's pretrained cfg marks {cls.__name__} fixed_input_size (a tensor or reshape tied to the size it "
            f"was built for)"
            if fixed
            else ""
        ),
        unsupported=no_patch_change(
            f"{cls.__name__} has no patch kernel timm-anysize resizes (its first layer {first} is adapted for "
            f"in_chans only); patch_size applies to the families with a patch embedding"
        ),
        example=cfg.get("architecture", ""),
        generic=True,
    )
