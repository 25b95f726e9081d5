"""Building models on the meta device fast: shapes only, and no weight init (meta tensors hold no values).

Planning a variant builds its base twice on the meta device (at the weights' geometry and at the variant's). The
constructors still run their weight init, and on meta tensors ``trunc_normal_`` and friends go through PyTorch's
Python reference decompositions: most of the build time, for values that do not exist. :func:`meta_device` skips
the in-place value-filling ops on meta tensors (they cannot change a meta tensor's shape, dtype or strides).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import timm
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from timm_anysize.core.errors import SpecError
from timm_anysize.core.family import Family
from timm_anysize.core.spec import VariantSpec

__all__ = ["meta_device", "build_meta", "create_meta_without_init"]

# In-place ops that only write values: on a meta tensor each is the identity. Shape-changing in-place ops
# (resize_, t_, squeeze_, set_ ...) are not listed and run as usual.
_VALUE_ONLY_INPLACE = frozenset(
    {
        "uniform_",
        "normal_",
        "erfinv_",
        "clamp_",
        "clamp_min_",
        "clamp_max_",
        "mul_",
        "add_",
        "sub_",
        "div_",
        "fill_",
        "zero_",
        "copy_",
        "exponential_",
        "bernoulli_",
        "random_",
        "log_normal_",
        "cauchy_",
        "geometric_",
        "trunc_normal_",
        "fill_diagonal_",
        "masked_fill_",
        "exp_",
        "log_",
        "sqrt_",
        "neg_",
        "abs_",
    }
)


class _SkipValueInit(TorchFunctionMode):
    """Makes the value-only in-place ops no-ops on meta tensors (weight init writes nothing there anyway)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in _VALUE_ONLY_INPLACE and args and isinstance(args[0], torch.Tensor):
            if args[0].is_meta:
                return args[0]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """``with torch.device("meta")``, with weight init skipped: build a model for its shapes only.

    Example:
        >>> import timm
        >>> with meta_device():
        ...     model = timm.create_model("test_vit")
        >>> model.pos_embed.is_meta, tuple(model.pos_embed.shape)
        (True, (1, 101, 64))
    """
    with torch.device("meta"), _SkipValueInit():
        yield


# Placement kwargs would pull a meta build onto a real device.
_PLACEMENT_KWARGS = ("device", "dtype")


def create_meta_without_init(base: str, kwargs: dict[str, Any]) -> Optional[nn.Module]:
    """``timm.create_model(base, **kwargs)`` on the meta device with timm's ``weight_init='skip'``, or None when the
    constructor has no such argument or rejects the value."""
    try:
        with torch.device("meta"):
            return timm.create_model(base, pretrained=False, weight_init="skip", **kwargs)
    except (TypeError, AssertionError):  # no such argument, or (NaFlexViT) one that asserts on 'skip'
        return None


def build_meta(spec: VariantSpec, kwargs: dict[str, Any], what: str, family: Optional[Family] = None) -> nn.Module:
    """Build the spec's base with ``kwargs`` on the meta device: shapes only, no memory.

    ``family``: the family's :meth:`~timm_anysize.core.family.Family.create` builds it (MViTv2's constructor takes
    square sizes only; a non-square size is built square and refitted).
    """
    kwargs = {k: v for k, v in kwargs.items() if k not in _PLACEMENT_KWARGS}

    def create(**kw: Any) -> nn.Module:
        # Weight init on meta tensors runs slow decompositions; ViT-family constructors can skip it.
        model = create_meta_without_init(spec.base, kw)
        if model is not None:
            return model
        with meta_device():
            return timm.create_model(spec.base, pretrained=False, **kw)

    try:
        return family.create(create, kwargs) if family is not None else create(**kwargs)
    except Exception as e:  # a constructor can raise anything on odd model_args; all of it is a bad spec
        raise SpecError(
            f"{spec.where}: timm cannot build {spec.arch} with the {what} arguments {kwargs}: {e}; "
            f"check img_size/patch_size/in_chans and model_args"
        ) from e
