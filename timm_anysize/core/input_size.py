"""The sizes a model runs at, checked before any layer runs: the smallest input its stem and stride chain take, the
multiple its stem needs, or, for a model built for one size, that size.

:func:`guard_input_size` puts the check on a model as a forward pre-hook; a too-small input, a non-multiple or (one
size only) another size raises the one documented :class:`~timm_anysize.core.errors.InputSizeError` (or its
subclass :class:`~timm_anysize.core.errors.InputNotDivisibleError`) naming the input size, the minimum or multiple
and the nearest sizes that work, instead of an error from deep inside torch. Where the family pads its stem input
(TResNet's space-to-depth with ``pad: true``), the hook pads the input to the multiple instead.

The smallest input is found from the model itself, once, the first time an input smaller than the model's own size
comes: its forward runs on the meta device (shapes only, no values, no cache touched) at the sizes of a binary search
per side. Sizes at least the model's own run (what it was built for).

The check runs in eager mode only: while scripting, tracing, compiling or exporting the model runs as timm's (a
scripted model compiles the hook, which does nothing there).
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.func import functional_call

from timm_anysize.core.cache import symbolic, traced
from timm_anysize.core.errors import InputNotDivisibleError
from timm_anysize.core.meta import no_empty_outputs
from timm_anysize.core.padding import check_fixed_size, check_input_size, pad_to_multiple
from timm_anysize.core.spec import Size2

__all__ = ["InputLimits", "guard_input_size", "input_limits", "probe_minimum"]

_probing = threading.local()  # set while a probe runs the model on the meta device: its own hook stands aside


@dataclass(frozen=True)
class InputLimits:
    """The input sizes a model runs at.

    Attributes:
        own: The size the model was built for (it runs there).
        minimum: The smallest (H, W) it runs at (its stem and stride chain).
        multiple: What each side must be a multiple of ((1, 1): anything; a family's own checks, such as the patch
            of a patch embedding with padding off, may refuse more, with the same error).
        fixed: It runs at ``own`` only (``dynamic: false``).
        pad: Inputs off ``multiple`` are padded bottom/right to it (the family's stem pads) rather than refused.
    """

    own: Size2
    minimum: Size2
    multiple: Size2 = (1, 1)
    fixed: bool = False
    pad: bool = False


class _Guard:
    """What the pre-hook checks, shared by the model and the module the input meets first (which holds the hook):
    the limits, and the model, to find its smallest input on the first input smaller than its own size."""

    def __init__(self, model: nn.Module, own: Size2, multiple: Size2, fixed: bool, pad: bool, what: str) -> None:
        self.model = model  # a plain attribute of a plain object: no module cycle, deepcopy and pickle follow it
        self.own, self.multiple, self.fixed, self.pad, self.what = own, multiple, fixed, pad, what
        self.minimum: Optional[Size2] = (1, 1) if fixed else None
        self.handle: Optional[torch.utils.hooks.RemovableHandle] = None

    def limits(self, like: Optional[torch.Tensor] = None) -> InputLimits:
        if self.minimum is None:
            self.minimum = probe_minimum(self.model, self.own, self.multiple, like)
        return InputLimits(self.own, self.minimum, self.multiple, self.fixed, self.pad)


_GUARD = "_anysize_input_guard"  # where a guarded model and its first module keep the _Guard


def _guard_of(module: nn.Module) -> Optional[_Guard]:
    guard = getattr(module, _GUARD, None)
    return guard if isinstance(guard, _Guard) else None


def _runs(model: nn.Module, state: dict, size: Size2, like: torch.Tensor) -> bool:
    """Whether the model's forward runs at ``size`` on the meta device, batch 2 (as a batch norm in training
    needs; an input its own checks refuse as not a
    multiple counts as large enough: only size is asked)."""
    x = torch.empty((2, like.shape[1], *size), dtype=like.dtype, device="meta")
    try:
        with torch.enable_grad(), no_empty_outputs():  # with a gradient, caches stand aside (computed inline)
            functional_call(model, state, (x,), strict=False)
    except InputNotDivisibleError:
        return True
    except Exception:  # whatever the stem or a stride raises, the model does not run there
        return False
    return True


def probe_minimum(model: nn.Module, own: Size2, multiple: Size2 = (1, 1), like: Optional[torch.Tensor] = None) -> Size2:
    """The smallest input (H, W) the model's forward runs at, searched on the meta device (shapes only).

    Each side is searched between one ``multiple`` and the model's ``own`` size, the other side at its own size;
    the model's weights, buffers and caches are untouched. Where the model does not run on the meta device at its
    own size, nothing is known: ``multiple`` comes back.

    Args:
        model: The model (its mode, train or eval, is the probe's).
        own: The size it runs at.
        multiple: Searched sizes are multiples of it.
        like: An input whose channels and dtype to probe with (default: 3 channels, float32).

    Returns:
        The smallest (H, W).

    Example:
        >>> import timm
        >>> probe_minimum(timm.create_model("convnext_atto").eval(), (224, 224))
        (32, 32)
    """
    like = torch.empty(1, 3, 1, 1) if like is None else like
    state = {
        k: torch.empty_like(v, device="meta").requires_grad_(v.is_floating_point()) for k, v in model.named_parameters()
    }
    state.update({k: torch.empty_like(v, device="meta") for k, v in model.named_buffers()})
    own = (int(own[0]), int(own[1]))
    out = [int(multiple[0]), int(multiple[1])]
    previous = getattr(_probing, "active", False)
    _probing.active = True
    # In training mode: timm's eval-mode caches (EfficientFormer-V2's attention biases) would keep a meta tensor
    # with a graph (unpicklable, un-deep-copyable); each module's own mode is restored after.
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        if not _runs(model, state, own, like):
            return out[0], out[1]
        if _runs(model, state, (out[0], out[1]), like):  # the smallest sizes both run: no search (most models)
            return out[0], out[1]
        for axis in (0, 1):
            m = out[axis]
            lo, hi = 1, max(1, own[axis] // m)  # in multiples of m: hi runs
            while lo < hi:
                mid = (lo + hi) // 2
                size = list(own)
                size[axis] = mid * m
                if _runs(model, state, (size[0], size[1]), like):
                    hi = mid
                else:
                    lo = mid + 1
            out[axis] = lo * m
    finally:
        _probing.active = previous
        for module, training in modes:
            module.training = training
    return out[0], out[1]


def input_limits(model: nn.Module) -> Optional[InputLimits]:
    """The input sizes a model built by timm-anysize runs at (its own size, the multiple and the smallest input,
    found now if not yet), or None for a model with no size guard.

    Example:
        >>> import timm
        >>> m = guard_input_size(timm.create_model("convnext_atto").eval(), own=(64, 64))
        >>> input_limits(m).minimum
        (32, 32)
    """
    guard = _guard_of(model)
    return None if guard is None else guard.limits()


def _input_size_hook(module: nn.Module, args: Tuple[torch.Tensor]) -> Tuple[torch.Tensor]:
    """Forward pre-hook: the input size checked (or padded to the multiple) before any layer runs; eager only (a
    scripted model compiles it as the identity)."""
    if torch.jit.is_scripting():
        return args
    return _check_or_pad(module, args)


@torch.jit.unused
def _check_or_pad(module: nn.Module, args: Tuple[torch.Tensor]) -> Tuple[torch.Tensor]:
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.ndim < 3 or symbolic(x) or traced() or getattr(_probing, "active", False):
        return args
    guard = _guard_of(module)
    if guard is None:  # the hook is registered with its guard (guard_input_size)
        return args
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if guard.fixed:
        check_fixed_size((h, w), guard.own)
        return args
    mh, mw = guard.multiple
    off = bool(h % mh or w % mw)
    small = h < guard.own[0] or w < guard.own[1]
    if not (off or small):
        return args
    minimum = guard.limits(x).minimum if small else (1, 1)
    if guard.pad and off:
        check_input_size((h, w), minimum)  # padding takes care of the multiple
        return (pad_to_multiple(x, [mh, mw]), *args[1:])
    check_input_size((h, w), minimum, guard.multiple, what=guard.what)
    return args


def _first_module(model: nn.Module, first_conv: str) -> nn.Module:
    """The module the input meets first: the outermost module on the path to ``first_conv`` that takes the image
    alone (a hook on it compiles under TorchScript: its forward has one argument); the model where none is named."""
    if not first_conv:
        return model
    module: Optional[nn.Module] = model
    found: Optional[nn.Module] = None
    for name in first_conv.split("."):
        module = getattr(module, name, None)
        if not isinstance(module, nn.Module):
            break
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue
        if isinstance(module, nn.Linear):  # a linear patch projection sees patches, not the image
            break
        params = list(inspect.signature(module.forward).parameters.values())
        if len(params) == 1 and params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            found = module
            break
        if any(p.default is inspect.Parameter.empty for p in params[1:]):
            # it needs more than the image (TNT's pixel embed takes pixel positions): what is inside sees pieces of
            # it; optional extra arguments (Hiera's mask) leave the image whole for the layers inside
            break
    return found if found is not None else model


def guard_input_size(
    model: nn.Module,
    own: Sequence[int],
    multiple: Sequence[int] = (1, 1),
    fixed: bool = False,
    pad: bool = False,
    what: str = "the stem",
    first_conv: str = "",
) -> nn.Module:
    """Check the input size of every (eager) forward of ``model`` before any layer runs, in place.

    The check is a forward pre-hook on the module the input meets first (the outermost module on the path to
    ``first_conv`` that takes the image alone, so that the model still compiles under TorchScript).

    Args:
        model: The model.
        own: The size it was built for (it runs there).
        multiple: What each side must be a multiple of.
        fixed: It runs at ``own`` only.
        pad: Pad inputs off ``multiple`` bottom/right instead of refusing them.
        what: What needs the multiple, for messages.
        first_conv: The first layer the input meets (the pretrained cfg's ``first_conv``); "": the model itself.

    Returns:
        The same model; :func:`input_limits` reads what it runs at.

    Example:
        >>> import timm
        >>> m = guard_input_size(timm.create_model("convnext_atto").eval(), own=(64, 64), first_conv="stem.0")
        >>> m(torch.zeros(1, 3, 15, 15))
        Traceback (most recent call last):
        ...
        timm_anysize.core.errors.InputSizeError: input 15x15 is smaller than the smallest input this model runs at, \
32x32 (its stem and strides); nearest sizes that work: 32x32; resize or pad the image to at least 32x32
    """
    old = _guard_of(model)
    if old is not None and old.handle is not None:
        old.handle.remove()
    size = (int(own[0]), int(own[1]))
    guard = _Guard(model, size, (1, 1) if fixed else (int(multiple[0]), int(multiple[1])), fixed, pad, what)
    first = _first_module(model, first_conv)
    guard.handle = first.register_forward_pre_hook(_input_size_hook)
    setattr(model, _GUARD, guard)
    setattr(first, _GUARD, guard)
    return model
