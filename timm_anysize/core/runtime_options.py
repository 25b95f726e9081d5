"""Run-time options: what the pipeline decides for a model that runs at any input size (the resampling of its
position embeddings and bias tables, another library's exact resampling, padding, cache size), handed to a family's
run-time code through one typed object, :class:`RuntimeOptions`.

:func:`set_runtime_options` puts the options on a module (the model; a layer a family's setup gives its own copy);
eager code reads them with :func:`runtime_options`, a forward through the methods of :class:`RuntimeOptionsMixin`
(TorchScript compiles them: the options are an attribute it can type, a ``NamedTuple``). Where they are kept is this
module's business: no family and no pipeline module spells the attribute. The caches of what derives from weights
(:func:`cache_for`), the one "scripting, else cached" branch of position embeddings (:meth:`RuntimeOptionsMixin.
pos_tokens_at`, :meth:`RuntimeOptionsMixin.image_pos_at`) and the class swap of a family's setup
(:func:`swap_classes`) live here too.
"""

from typing import Callable, List, Mapping, NamedTuple, Optional

import torch
import torch.nn as nn
from timm.layers.helpers import is_exporting

from timm_anysize.core.attributes import module_attr, size_attr
from timm_anysize.core.cache import (
    DEFAULT_CACHE_SIZE,
    PosEmbedCache,
    cached_or_inline,
    resample_image_pos,
    symbolic,
    traced,
)
from timm_anysize.core.errors import AnysizeError
from timm_anysize.core.resample import resample_pos_tokens

# The one resampling of token position embeddings lives in core.resample (shared with loads), that of image-laid-out
# ones in core.cache; their calls here are FX leaves too (fx.wrap patches the calling module's globals).
torch.fx.wrap("resample_pos_tokens")
torch.fx.wrap("resample_image_pos")

__all__ = [
    "RuntimeOptions",
    "set_runtime_options",
    "runtime_options",
    "cache_for",
    "runtime_caches",
    "RuntimeOptionsMixin",
    "dynamic_pos_embed",
    "dynamic_image_pos_embed",
    "swap_classes",
]

_OPTIONS = "_anysize_options"  # the attribute holding a module's RuntimeOptions (RuntimeOptionsMixin declares it)
_CACHES = "_anysize_caches"  # name of a weight -> its PosEmbedCache


class RuntimeOptions(NamedTuple):
    """How a module resamples what derives from its weights at run time, and whether its model pads.

    A ``NamedTuple``, not a dataclass: TorchScript types it as a module attribute (a dataclass it cannot compile).

    Example:
        >>> RuntimeOptions(pad=False)
        RuntimeOptions(interpolation='bicubic', antialias=True, pad=False, compat='timm', cache_size=16)
    """

    interpolation: str = "bicubic"  # of position embeddings (and LeViT-style bias tables)
    antialias: bool = True  # when a grid shrinks
    pad: bool = True  # inputs off the patch (or window) multiple are padded bottom/right, else refused
    compat: str = "timm"  # another library's exact resampling: timm_anysize.core.compat
    cache_size: int = DEFAULT_CACHE_SIZE  # entries of each cache (cache_for)


def set_runtime_options(module: nn.Module, options: RuntimeOptions) -> None:
    """Give ``module`` its run-time options, with empty caches (entries made under other options are dropped).

    Example:
        >>> m = nn.Linear(2, 2)
        >>> set_runtime_options(m, RuntimeOptions(interpolation="bilinear"))
        >>> runtime_options(m).interpolation
        'bilinear'
    """
    setattr(module, _OPTIONS, options)
    setattr(module, _CACHES, {})


def runtime_options(module: object) -> Optional[RuntimeOptions]:
    """The run-time options of ``module`` (:func:`set_runtime_options`), None where it has none.

    Example:
        >>> runtime_options(nn.Linear(2, 2)) is None
        True
    """
    return getattr(module, _OPTIONS, None)


def cache_for(module: nn.Module, name: str, make: bool = True) -> Optional[PosEmbedCache]:
    """The cache of what derives from the weight ``name`` of ``module`` (each weight has its own, stamped by it), made
    on first use with the options' ``cache_size`` (``make`` False: only one made before); None where the module has
    no run-time options (always inline) or, ``make`` False, no such cache yet.

    Example:
        >>> m = nn.Linear(2, 2)
        >>> set_runtime_options(m, RuntimeOptions(cache_size=3))
        >>> cache_for(m, "weight") is cache_for(m, "weight"), cache_for(m, "weight").maxsize
        (True, 3)
    """
    options = runtime_options(module)
    if options is None:
        return None
    caches: dict = getattr(module, _CACHES)
    cache = caches.get(name)  # made once (not on every inline forward), atomically
    if cache is not None or not make:
        return cache
    return caches.setdefault(name, PosEmbedCache(options.cache_size))


def runtime_caches(module: nn.Module) -> List[PosEmbedCache]:
    """The caches :func:`cache_for` made for ``module`` (not its children)."""
    return list(getattr(module, _CACHES, {}).values())


def _resample_tokens(pos_embed: torch.Tensor, grid, native, prefix: int, opts: RuntimeOptions) -> torch.Tensor:
    return resample_pos_tokens(
        pos_embed, [grid[0], grid[1]], list(native), prefix, opts.interpolation, opts.antialias, opts.compat
    )


def _options(model: nn.Module) -> RuntimeOptions:
    options = runtime_options(model)
    if options is None:
        raise AnysizeError(f"{type(model).__name__} has no run-time options; call timm_anysize.enable_dynamic first")
    return options


def dynamic_pos_embed(
    model: nn.Module,
    grid: tuple[int, int],
    prefix: Optional[int] = None,
    name: str = "pos_embed",
    native: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """A token position embedding ``[1, prefix + H*W, C]`` for a patch grid: the model's own at the native grid,
    else resampled (cached).

    Args:
        model: A model set up by ``enable_dynamic``.
        grid: The patch grid of this forward.
        prefix: Leading entries that belong to prefix tokens (default: the model's, none with ``no_embed_class``).
        name: The embedding's attribute (CrossViT has one per branch).
        native: The grid the embedding is laid out on (default: the patch embedding's).

    Example:
        >>> import timm
        >>> m = timm.create_model("test_vit", img_size=32, patch_size=8)
        >>> set_runtime_options(m, RuntimeOptions())
        >>> dynamic_pos_embed(m, (4, 4)) is m.pos_embed, dynamic_pos_embed(m, (6, 2)).shape
        (True, torch.Size([1, 13, 64]))
    """
    pos_embed = getattr(model, name)
    native = (native[0], native[1]) if native else size_attr(model.get_submodule("patch_embed"), "grid_size")
    opts = _options(model)
    if prefix is not None:
        n_prefix = prefix
    else:
        n_prefix = 0 if getattr(model, "no_embed_class", False) else module_attr(model, "num_prefix_tokens", int)
    if symbolic(grid) or symbolic(grid[0]):  # FX: one leaf node, resampled on every call of the graph
        return _resample_tokens(pos_embed, grid, native, n_prefix, opts)
    if not is_exporting() and not torch.compiler.is_compiling() and tuple(grid) == native:
        return pos_embed

    def compute() -> torch.Tensor:
        return _resample_tokens(pos_embed, grid, native, n_prefix, opts)

    if traced():  # inline, before int() of a symbolic size would specialize the compiled or exported graph
        return compute()
    return cached_or_inline(cache_for(model, name), (int(grid[0]), int(grid[1])), pos_embed, compute)


def dynamic_image_pos_embed(
    model: nn.Module, grid: tuple[int, int], channels_last: bool, name: str = "pos_embed"
) -> torch.Tensor:
    """A position embedding laid out as an image, ``[1, C, H, W]`` (PiT, Visformer's per stage: ``name``) or
    ``[1, H, W, C]`` (VOLO, SAM), for a grid: the model's own at its native grid, else resampled (cached).

    Example:
        >>> m = nn.Module()
        >>> m.pos_embed = nn.Parameter(torch.zeros(1, 8, 4, 4))
        >>> set_runtime_options(m, RuntimeOptions())
        >>> dynamic_image_pos_embed(m, (6, 2), channels_last=False).shape
        torch.Size([1, 8, 6, 2])
    """
    pos_embed = getattr(model, name)
    opts = _options(model)
    if symbolic(grid) or symbolic(grid[0]) or traced():  # FX (one leaf node), compiling, exporting: no shape branch
        return resample_image_pos(pos_embed, [grid[0], grid[1]], opts.interpolation, opts.antialias, channels_last)
    native = tuple(pos_embed.shape[1:3] if channels_last else pos_embed.shape[2:4])
    grid = (int(grid[0]), int(grid[1]))
    if grid == native:
        return pos_embed

    def compute() -> torch.Tensor:
        return resample_image_pos(pos_embed, list(grid), opts.interpolation, opts.antialias, channels_last)

    return cached_or_inline(cache_for(model, name), (grid,), pos_embed, compute)


class RuntimeOptionsMixin:
    """The run-time options of a family's dynamic module, read in its forward (TorchScript compiles these methods:
    the options are a typed attribute), and the one branch of its position embeddings: under TorchScript the same
    resampling (function and options) as the eager path, without its cache; else the cached path (FX: one leaf node;
    compiling, exporting: inline).
    """

    _anysize_options: RuntimeOptions  # declared for TorchScript (set by set_runtime_options)

    def __init_subclass__(cls, **kwargs) -> None:
        """Declare the annotations of every base to TorchScript, not this mixin's alone: it reads the first class
        in the MRO that has any (timm's modules declare theirs: ``Final`` constants, ``Dict[str, Tensor]`` caches)."""
        super().__init_subclass__(**kwargs)
        merged: dict = {}
        for base in reversed(cls.__mro__):
            if base not in (object, nn.Module):
                merged.update(base.__dict__.get("__annotations__", {}))
        cls.__annotations__ = merged

    def anysize_options(self) -> RuntimeOptions:
        """This module's run-time options (:func:`set_runtime_options`)."""
        return self._anysize_options

    def pos_tokens_at(
        self, pos_embed: torch.Tensor, grid: List[int], native: List[int], prefix: int, name: str = "pos_embed"
    ) -> torch.Tensor:
        """The token position embedding ``name`` (``pos_embed``, this module's attribute of that name) laid out on
        ``native`` with ``prefix`` leading entries, at ``grid`` (:func:`dynamic_pos_embed`)."""
        if torch.jit.is_scripting():
            o = self._anysize_options
            return resample_pos_tokens(pos_embed, grid, native, prefix, o.interpolation, o.antialias, o.compat)
        return self._cached_pos_tokens(grid, native, prefix, name)

    @torch.jit.unused
    def _cached_pos_tokens(self, grid: List[int], native: List[int], prefix: int, name: str) -> torch.Tensor:
        return dynamic_pos_embed(self, grid, prefix, name, tuple(native))  # type: ignore[arg-type]

    def image_pos_at(
        self, pos_embed: torch.Tensor, grid: List[int], channels_last: bool, name: str = "pos_embed"
    ) -> torch.Tensor:
        """The position embedding ``name`` (``pos_embed``) laid out as an image, at ``grid``
        (:func:`dynamic_image_pos_embed`)."""
        if torch.jit.is_scripting():
            o = self._anysize_options
            return resample_image_pos(pos_embed, grid, o.interpolation, o.antialias, channels_last)
        return self._cached_image_pos(grid, channels_last, name)

    @torch.jit.unused
    def _cached_image_pos(self, grid: List[int], channels_last: bool, name: str) -> torch.Tensor:
        return dynamic_image_pos_embed(self, grid, channels_last, name)  # type: ignore[arg-type]


def swap_classes(
    model: nn.Module,
    classes: Mapping[type, type],
    options: Optional[RuntimeOptions] = None,
    where: Optional[Callable[[nn.Module], bool]] = None,
) -> List[nn.Module]:
    """Give each module of ``model`` (itself included) whose class is a key of ``classes`` (and, given ``where``, for
    which it is true) the class it maps to, in place (a family's dynamic subclasses of timm's modules), and
    ``options`` (:func:`set_runtime_options`) if given.

    Returns:
        The modules swapped, in ``model.modules()`` order.

    Example:
        >>> class Scaled(nn.Linear):
        ...     pass
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> [type(s).__name__ for s in swap_classes(m, {nn.Linear: Scaled})], type(m[0]).__name__
        (['Scaled'], 'Scaled')
    """
    swapped = []
    for module in list(model.modules()):
        cls = classes.get(type(module))
        if cls is not None and (where is None or where(module)):
            module.__class__ = cls
            if options is not None:
                set_runtime_options(module, options)
            swapped.append(module)
    return swapped
