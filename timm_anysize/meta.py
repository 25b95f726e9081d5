"""Building models on the meta device fast: shapes only, and no weight init (meta tensors hold no values).

Planning a variant builds its base twice on the meta device (at the weights' geometry and at the variant's). The
constructors still run their weight init, and on meta tensors ``trunc_normal_`` and friends go through PyTorch's
Python reference decompositions: most of the build time, for values that do not exist. :func:`meta_device` skips
the in-place value-filling ops on meta tensors (they cannot change a meta tensor's shape, dtype or strides).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["meta_device"]

# In-place ops that only write values: on a meta tensor each is the identity. Shape-changing in-place ops
# (resize_, t_, squeeze_, set_ ...) are not listed and run as usual.
_VALUE_ONLY_INPLACE = frozenset({
    "uniform_", "normal_", "erfinv_", "clamp_", "clamp_min_", "clamp_max_", "mul_", "add_", "sub_", "div_",
    "fill_", "zero_", "copy_", "exponential_", "bernoulli_", "random_", "log_normal_", "cauchy_", "geometric_",
    "trunc_normal_", "fill_diagonal_", "masked_fill_", "exp_", "log_", "sqrt_", "neg_", "abs_",
})


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
