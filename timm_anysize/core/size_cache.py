"""Caching what depends on sizes only (a window mask, relative coordinates, an interpolation's indices and weights),
per size and shared by every model; and :func:`traced`, when nothing may be cached (no state in a graph).
"""

import functools
import logging
from typing import Any, Callable, TypeVar

import torch
from timm.layers.helpers import is_exporting

__all__ = ["size_lru_cache", "traced"]

_logger = logging.getLogger(__name__)

T = TypeVar("T")


def traced() -> bool:
    """Scripting, tracing, compiling or exporting: run timm's plain path, no caches and no shape shortcuts."""
    return torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling() or is_exporting()


def size_lru_cache(maxsize: int = 64) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """``functools.lru_cache`` for a value that depends on sizes only (a window mask, relative coordinates), shared by
    every model: bounded, each miss logged at DEBUG with the hit rate so far, as
    :class:`timm_anysize.core.cache.PosEmbedCache` logs its own. A value is made outside inference mode, so a call in
    ``torch.inference_mode()`` caches tensors a later training step can use. While scripting, tracing, compiling or
    exporting the function runs uncached (no state in a graph).

    Args:
        maxsize: The entries kept (least recently used dropped first).

    Example:
        >>> @size_lru_cache(maxsize=2)
        ... def area(h: int, w: int) -> int:
        ...     return h * w
        >>> area(2, 3), area(2, 3), area.cache_info().hits
        (6, 6, 1)
    """

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        def normal_tensors(*args: Any) -> T:
            with torch.inference_mode(False):  # a value made in inference mode could never reach autograd later
                return fn(*args)

        cached = functools.lru_cache(maxsize=maxsize)(normal_tensors)

        @functools.wraps(fn)
        def call(*args: Any) -> T:
            if traced():
                return fn(*args)
            if not _logger.isEnabledFor(logging.DEBUG):
                return cached(*args)
            misses = cached.cache_info().misses
            value = cached(*args)
            info = cached.cache_info()
            if info.misses > misses:  # a new size: rare, and worth a line
                lookups = info.hits + info.misses
                _logger.debug(
                    "size cache miss for %s%s: hit rate %d/%d (%.0f%%), %d of %d entries",
                    fn.__name__,
                    args,
                    info.hits,
                    lookups,
                    100.0 * info.hits / lookups,
                    info.currsize,
                    maxsize,
                )
            return value

        call.cache_info = cached.cache_info  # type: ignore[attr-defined]
        call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        return call

    return wrap
