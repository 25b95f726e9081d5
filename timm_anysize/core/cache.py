"""Caching what is derived from weights (resampled position embeddings, resized bias tables) for the dynamic paths,
and when not to: while tracing, compiling or exporting, or when a gradient must flow to the weights. Every miss is a
DEBUG line with the hit rate so far. (What depends on sizes only is cached by :mod:`timm_anysize.core.size_cache`.)
"""

import logging
import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable, List, Optional

import torch
from timm.layers import register_notrace_function

from timm_anysize.core.errors import AnysizeError
from timm_anysize.core.resample import resample_grid
from timm_anysize.core.size_cache import traced

__all__ = [
    "PosEmbedCache",
    "DEFAULT_CACHE_SIZE",
    "traced",
    "must_run_inline",
    "cached_or_inline",
    "resample_image_pos",
    "patch_grid",
    "symbolic",
]

DEFAULT_CACHE_SIZE = 16

_logger = logging.getLogger(__name__)


class PosEmbedCache:
    """A bounded, thread-safe LRU cache of resampled position embeddings, stamped by the weights they came from.

    Copies and pickles of a model get a fresh, empty cache (a lock cannot be copied, and entries are derived).

    Example:
        >>> cache, weights = PosEmbedCache(maxsize=2), torch.zeros(3)
        >>> cache.get_or_compute(("a",), weights, compute=lambda: weights + 1).tolist()
        [1.0, 1.0, 1.0]
        >>> _ = weights.add_(1)  # an in-place write moves the version counter: the entry is stale
        >>> cache.get_or_compute(("a",), weights, lambda: weights + 1).tolist(), cache.info()["invalidations"]
        ([2.0, 2.0, 2.0], 1)
    """

    def __init__(self, maxsize: int = DEFAULT_CACHE_SIZE):
        if maxsize < 1:
            raise AnysizeError(f"cache size must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._stamp: Any = None
        self._source: Optional[weakref.ref] = None
        self.hits = self.misses = self.invalidations = 0

    def get_or_compute(self, key: tuple, source: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The entry for ``key``, computing it on a miss; all entries are dropped when ``source`` changed.

        ``source`` (the weights entries derive from) changed when it is another tensor object, or its storage,
        version counter (moved by every in-place write: optimizer steps, ``load_state_dict``), dtype or device
        differ.
        """
        stamp = (source.data_ptr(), source._version, source.dtype, source.device)
        with self._lock:
            if stamp != self._stamp or self._source is None or self._source() is not source:
                if self._entries:
                    self.invalidations += 1
                self._entries.clear()
                self._stamp, self._source = stamp, weakref.ref(source)
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return value
            self.misses += 1
            if _logger.isEnabledFor(logging.DEBUG):  # a miss is a new size (or new weights): rare, and worth a line
                lookups = self.hits + self.misses
                _logger.debug(
                    "size cache miss for %s: hit rate %d/%d (%.0f%%), %d of %d entries",
                    key,
                    self.hits,
                    lookups,
                    100.0 * self.hits / lookups,
                    len(self._entries) + 1,
                    self.maxsize,
                )
            value = compute()
            self._entries[key] = value
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
            return value

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self._stamp = self._source = None

    def info(self) -> dict[str, int]:
        """Counters and size, e.g. ``{'hits': 3, 'misses': 1, 'invalidations': 0, 'size': 1, 'maxsize': 16}``."""
        with self._lock:
            return dict(
                hits=self.hits,
                misses=self.misses,
                invalidations=self.invalidations,
                size=len(self._entries),
                maxsize=self.maxsize,
            )

    def __deepcopy__(self, memo: dict) -> "PosEmbedCache":
        return PosEmbedCache(self.maxsize)

    def __getstate__(self) -> dict:
        return {"maxsize": self.maxsize}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["maxsize"])  # type: ignore[misc]


# Leaf functions of the dynamic paths: TorchScript compiles them, FX records them as one node (timm's notrace registry,
# and torch.fx.wrap so that they are leaves whichever module's forward calls them, as timm's resample_abs_pos_embed).
@torch.fx.wrap
@register_notrace_function
def resample_image_pos(
    pos_embed: torch.Tensor, grid: List[int], interpolation: str, antialias: bool, channels_last: bool
) -> torch.Tensor:
    """A position embedding laid out as an image resampled to ``grid`` (:func:`timm_anysize.core.resample.resample_grid`).

    Example:
        >>> resample_image_pos(torch.randn(1, 8, 4, 4), [6, 2], "bicubic", True, False).shape
        torch.Size([1, 8, 6, 2])
    """
    return resample_grid(pos_embed, grid, interpolation, antialias, channels_last)


@torch.fx.wrap
@register_notrace_function
def patch_grid(x: torch.Tensor, patch_size: List[int], pad: bool) -> List[int]:
    """The patch grid of an image ``[..., H, W]``: whole patches, or patches of the image padded bottom/right.

    Example:
        >>> patch_grid(torch.zeros(1, 3, 70, 64), [16, 16], True), patch_grid(torch.zeros(1, 3, 70, 64), [16, 16], False)
        ([5, 4], [4, 4])
    """
    h, w = x.shape[-2], x.shape[-1]
    if pad:
        return [(h + patch_size[0] - 1) // patch_size[0], (w + patch_size[1] - 1) // patch_size[1]]
    return [h // patch_size[0], w // patch_size[1]]


def symbolic(value: Any) -> bool:
    """An FX symbolic trace is recording: sizes are Proxies, so only leaf functions may look at them."""
    return isinstance(value, torch.fx.Proxy)


def must_run_inline(pos_embed: torch.Tensor) -> bool:
    """Whether what derives from ``pos_embed`` must be computed inline, not cached: while tracing, compiling or
    exporting (no state in the graph), or when a gradient can flow to it."""
    return traced() or (torch.is_grad_enabled() and pos_embed.requires_grad)


def cached_or_inline(
    cache: Optional[PosEmbedCache], key: tuple, weight: torch.Tensor, compute: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """``compute()``, a tensor derived from ``weight`` (a resampled embedding, a resized bias table or kernel):
    cached under ``key`` (plus the weight's dtype and device and the inference mode), detached, while no gradient can
    flow to ``weight``; inline where it must be (:func:`must_run_inline`) or there is no ``cache``.

    Args:
        cache: The cache of ``weight`` (each weight has its own, stamped by it); None: always inline.
        key: What the value depends on besides the weight (a grid, a window, a patch size).
        weight: The tensor the value derives from; a change of it invalidates the cache.
        compute: Computes the value from ``weight`` (with the graph to it when a gradient can flow).

    Example:
        >>> cache, weight = PosEmbedCache(), torch.ones(3)
        >>> with torch.no_grad():
        ...     a = cached_or_inline(cache, ((2, 2),), weight, lambda: weight * 2)
        ...     b = cached_or_inline(cache, ((2, 2),), weight, lambda: weight * 3)
        >>> a is b, cache.info()["hits"]
        (True, 1)
    """
    if cache is None or must_run_inline(weight):
        return compute()
    full_key = (*key, weight.dtype, weight.device, torch.is_inference_mode_enabled())
    return cache.get_or_compute(full_key, weight, lambda: compute().detach())
