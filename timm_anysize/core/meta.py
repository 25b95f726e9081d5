"""Building models on the meta device fast: shapes only, and no weight init (meta tensors hold no values).

Planning a variant builds its base twice on the meta device (at the weights' geometry and at the variant's). The
constructors still run their weight init, and on meta tensors ``trunc_normal_`` and friends go through PyTorch's
Python reference decompositions: most of the build time, for values that do not exist. :func:`meta_device` skips
the in-place value-filling ops on meta tensors (they cannot change a meta tensor's shape, dtype or strides).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterable, Iterator, Optional

import timm
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from timm_anysize.core.errors import SpecError
from timm_anysize.core.family import Family
from timm_anysize.core.spec import VariantSpec

__all__ = [
    "meta_device",
    "parameters_uninitialised",
    "initialize_fresh",
    "no_empty_outputs",
    "EmptyOutputError",
    "build_meta",
    "create_meta_without_init",
]

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
        # torch.nn.init's functions reach a TorchFunctionMode whole (their in-place ops then run inside it, unseen)
        "kaiming_uniform_",
        "kaiming_normal_",
        "xavier_uniform_",
        "xavier_normal_",
        "constant_",
        "ones_",
        "zeros_",
        "orthogonal_",
        "eye_",
        "dirac_",
        "sparse_",
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


class _SkipParameterInit(TorchFunctionMode):
    """Makes the value-only in-place ops no-ops on the storage of parameters registered while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.params: list[torch.Tensor] = []  # held, so no storage is freed and reused during the build
        self.storages: set[int] = set()

    def add(self, param: torch.Tensor) -> None:
        if param.numel() and not param.is_meta:
            self.params.append(param)
            self.storages.add(param.untyped_storage().data_ptr())

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        t = args[0] if args else (kwargs or {}).get("tensor")
        if getattr(func, "__name__", "") in _VALUE_ONLY_INPLACE and isinstance(t, torch.Tensor):
            if t.is_meta or (t.numel() and t.untyped_storage().data_ptr() in self.storages):
                return t
        return func(*args, **(kwargs or {}))


# nn.Module.register_parameter is patched while any thread builds under parameters_uninitialised (counted, under a
# lock); each parameter goes to the innermost build of the thread that registers it, so concurrent builds in other
# threads, and models built outside one, are untouched.
_register_lock = threading.Lock()
_register_users = 0
_register_original = nn.Module.register_parameter
_building = threading.local()


def _register_tracked(self: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
    _register_original(self, name, param)
    modes = getattr(_building, "modes", None)
    if param is not None and modes:
        modes[-1].add(param)


@contextlib.contextmanager
def parameters_uninitialised() -> Iterator[None]:
    """Build a model whose parameters are allocated but never written (their pages never touched), buffers as usual.

    For a model about to be loaded with ``load_state_dict(..., assign=True)``: the checkpoint's (memory-mapped)
    tensors take the parameters' place, so the untouched allocations never become resident memory and loading holds
    the weights once. Buffers (relative-position indices, attention masks) are computed by the constructor on the
    model's device as usual, which a meta-device build cannot do (Swin derives its mask's device from a parameter).
    Weight init writes nothing to the parameters: the ones no checkpoint tensor replaces must be initialised after
    (:func:`initialize_fresh`). Thread-safe: only the parameters the calling thread registers inside the block are
    affected (``nn.Module.register_parameter`` is wrapped while any thread is inside one).

    Example:
        >>> import timm
        >>> with parameters_uninitialised():
        ...     model = timm.create_model("test_vit")
        >>> model.pos_embed.is_meta, tuple(model.blocks[0].attn.qkv.weight.shape)
        (False, (192, 64))
    """
    global _register_users
    mode = _SkipParameterInit()
    with _register_lock:
        if _register_users == 0:
            nn.Module.register_parameter = _register_tracked  # type: ignore[method-assign]
        _register_users += 1
    modes = _building.__dict__.setdefault("modes", [])
    modes.append(mode)
    try:
        with mode:
            yield
    finally:
        modes.pop()
        with _register_lock:
            _register_users -= 1
            if _register_users == 0:
                nn.Module.register_parameter = _register_original  # type: ignore[method-assign]


def initialize_fresh(model: nn.Module, keys: Iterable[str]) -> None:
    """Initialise the named tensors of a model built by :func:`parameters_uninitialised`: the ones no checkpoint
    tensor replaced (a new head, a declared fresh init).

    A module whose every parameter is fresh is reset as ``reset_classifier`` leaves a new head: PyTorch's own
    ``reset_parameters`` (nn.Linear, nn.Conv2d, nn.LayerNorm ...). A lone tensor gets timm's usual init: 1-D
    ``weight`` ones, ``bias`` zeros, anything else ``trunc_normal_(std=0.02)``.

    Example:
        >>> import timm
        >>> with parameters_uninitialised():
        ...     model = timm.create_model("test_vit", num_classes=3)
        >>> initialize_fresh(model, ["head.weight", "head.bias", "norm.weight"])
        >>> float(model.norm.weight.sum()), bool(model.head.weight.abs().max() <= 1 / 64**0.5)
        (64.0, True)
    """
    by_module: dict[str, list[str]] = {}
    for key in keys:
        owner, _, name = key.rpartition(".")
        by_module.setdefault(owner, []).append(name)
    with torch.no_grad():
        for owner, names in by_module.items():
            module = model.get_submodule(owner)
            if any(getattr(module, n).is_meta for n in names):
                continue  # a model placed on meta (device="meta") holds shapes only
            own = {n for n, _ in module.named_parameters(recurse=False)}
            reset = getattr(module, "reset_parameters", None)
            if own <= set(names) and callable(reset):
                reset()
                continue
            for name in names:
                t = getattr(module, name)
                if name == "bias" or not t.is_floating_point():
                    t.zero_()
                elif name == "weight" and t.ndim == 1:
                    t.fill_(1.0)
                else:
                    nn.init.trunc_normal_(t, std=0.02)


class EmptyOutputError(RuntimeError):
    """A layer's output has a zero-size dimension: the input was too small for the layers before it."""


def _refuse_empty(module: nn.Module, args: Any, output: Any) -> None:
    if isinstance(output, torch.Tensor) and output.is_meta and output.ndim >= 2 and 0 in output.shape[1:]:
        raise EmptyOutputError(f"{type(module).__name__} gives an empty output {tuple(output.shape)}")


@contextlib.contextmanager
def no_empty_outputs() -> Iterator[None]:
    """While a model runs on the meta device: a layer whose output has a zero-size dimension (tokens, channels,
    height or width; the batch aside) raises
    :class:`EmptyOutputError`. The meta device checks shapes but not every size rule (an interpolation to 0x0, a
    pooling to nothing run without complaint there), so a probe that an input is large enough needs this.

    Example:
        >>> pool = nn.AdaptiveAvgPool2d((0, 0))
        >>> with no_empty_outputs():
        ...     pool(torch.empty(1, 3, 4, 4, device="meta"))
        Traceback (most recent call last):
        ...
        timm_anysize.core.meta.EmptyOutputError: AdaptiveAvgPool2d gives an empty output (1, 3, 0, 0)
    """
    handle = nn.modules.module.register_module_forward_hook(_refuse_empty)
    try:
        yield
    finally:
        handle.remove()


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
