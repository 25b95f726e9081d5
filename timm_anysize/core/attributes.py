"""Plain attributes of torch modules, read with their type checked.

torch types ``nn.Module.__getattr__`` as ``Tensor | Module`` (what it finds in ``_parameters``, ``_buffers`` and
``_modules``), so a plain attribute a timm class sets in ``__init__`` (``patch_embed.grid_size``, ``out_indices``) or
one timm-anysize keeps on a model reads as ``Tensor | Module`` to the type checker. :func:`module_attr` reads it as
the type it has, and says so clearly where it has another.
"""

from __future__ import annotations

from typing import Any, Tuple, Type, TypeVar, Union

__all__ = ["module_attr", "size_attr", "set_pretrained_cfg"]

T = TypeVar("T")


def module_attr(module: object, name: str, kind: Union[Type[T], Tuple[Type[T], ...]]) -> T:
    """``getattr(module, name)``, checked to be a ``kind`` (a TypeError naming the module, the attribute and both
    types otherwise).

    Example:
        >>> import torch.nn as nn
        >>> module_attr(nn.Linear(2, 3), "out_features", int)
        3
        >>> module_attr(nn.Linear(2, 3), "weight", int)
        Traceback (most recent call last):
        TypeError: Linear.weight: expected int, got Parameter
    """
    value = getattr(module, name)
    if not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        expected = " or ".join(k.__name__ for k in kinds)
        raise TypeError(f"{type(module).__name__}.{name}: expected {expected}, got {type(value).__name__}")
    return value


def size_attr(module: object, name: str) -> tuple[int, int]:
    """An (H, W) pair a module keeps as a tuple or list of two ints (timm's ``grid_size``, ``img_size``,
    ``patch_size``), as a tuple of ints.

    Example:
        >>> import timm
        >>> size_attr(timm.create_model("test_vit", img_size=32, patch_size=8).patch_embed, "grid_size")
        (4, 4)
    """
    value = module_attr(module, name, (tuple, list))
    return int(value[0]), int(value[1])


def set_pretrained_cfg(model: object, cfg: dict[str, Any]) -> None:
    """Set timm's ``pretrained_cfg`` and ``default_cfg`` (the same dict, as timm's builder leaves them) on a model.

    Example:
        >>> import timm
        >>> m = timm.create_model("test_vit")
        >>> set_pretrained_cfg(m, {"num_classes": 10})
        >>> m.pretrained_cfg is m.default_cfg, m.pretrained_cfg
        (True, {'num_classes': 10})
    """
    setattr(model, "pretrained_cfg", cfg)
    setattr(model, "default_cfg", cfg)
