"""timm's ``forward_intermediates``, written once: the dynamic families configure it with the steps that are theirs.

timm gives every model a ``forward_intermediates(x, indices, norm, stop_early, output_fmt, intermediates_only)``
(``features_only`` models and ``FeatureGetterNet`` call it): embed the input, run the blocks (or stages), take the
feature map of the blocks ``indices`` names, stop after the last one taken when ``stop_early``, and return them
alone or with the final output. What varies between architectures is small: how the input is embedded, how one
block is called (a patch grid, a bias, a class token or a second token stream passed along), how a block's output
becomes a feature map (prefix tokens split off, tokens laid out on the grid of this call) and what the final output
is. A dynamic model class mixes in :class:`Intermediates` (timm's signature) or :class:`PrefixTokenIntermediates`
(with ``return_prefix_tokens``, as timm's BEiT and TNT) and defines those steps as hooks:

- ``_intermediates_embed(x) -> (x, ctx)``: the input embedded for the first block, and the context of this call
  that the other hooks read (the patch grid, a bias, class tokens, ...; anything);
- ``_intermediates_feature(i, x, ctx, norm, output_fmt)``: block ``i``'s feature map (with
  :class:`PrefixTokenIntermediates`: a ``(feature map, prefix tokens)`` pair, e.g. :func:`token_features`);
- optionally ``_intermediates_blocks()`` (default ``self.blocks``), ``_intermediates_ends()`` (the block that ends
  each feature level, as timm's ``stage_ends``; default ``None``: every block is a level),
  ``_intermediates_block(i, block, x, ctx) -> (x, ctx)`` (default ``block(x)``) and
  ``_intermediates_final(x, ctx, last)`` (default ``self.norm(x)``; ``last``: the last block ran).

An architecture whose timm ``forward_intermediates`` already runs at any size once its input is prepared (padded
to whole windows) mixes in :class:`TimmIntermediates` instead, and keeps timm's loop.

TorchScript compiles ``forward`` and what it calls, never ``forward_intermediates`` (timm's own is not scripted
either); FX traces ``forward``. The hooks are plain Python.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm_anysize.core.timm_private import feature_take_indices

__all__ = ["Intermediates", "PrefixTokenIntermediates", "TimmIntermediates", "token_features", "tokens_to_nchw"]


def tokens_to_nchw(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Patch tokens ``[B, H*W, C]`` (row-major over the grid) as a feature map ``[B, C, H, W]``, contiguous.

    Example:
        >>> tokens_to_nchw(torch.randn(2, 3 * 5, 8), [3, 5]).shape
        torch.Size([2, 8, 3, 5])
    """
    return tokens.reshape(tokens.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()


def token_features(
    tokens: torch.Tensor, grid: Sequence[int], num_prefix: int, output_fmt: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A block's tokens ``[B, prefix + H*W, C]`` as timm's ``forward_intermediates`` returns them: the patch tokens
    (``NCHW``: laid out on ``grid``, the grid of this call; ``NLC``: as they are) and the prefix tokens split off.

    Example:
        >>> fmap, prefix = token_features(torch.randn(2, 1 + 3 * 5, 8), [3, 5], 1, "NCHW")
        >>> fmap.shape, prefix.shape
        (torch.Size([2, 8, 3, 5]), torch.Size([2, 1, 8]))
    """
    prefix = tokens[:, 0:num_prefix]
    tokens = tokens[:, num_prefix:]
    return (tokens_to_nchw(tokens, grid) if output_fmt == "NCHW" else tokens), prefix


class Intermediates:
    """Mixin: timm's ``forward_intermediates`` from the model's hooks (see the module docstring).

    Class attributes: ``intermediates_formats``, the ``output_fmt`` values the model takes, and
    ``intermediates_format_error``, timm's message for another.

    Example:
        >>> import torch.nn as nn
        >>> class Tokens(Intermediates, nn.Module):  # two blocks over patch tokens, any grid
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.blocks, self.norm = nn.ModuleList([nn.Identity(), nn.Identity()]), nn.LayerNorm(3)
        ...     def _intermediates_embed(self, x):
        ...         return x.flatten(2).transpose(1, 2), [x.shape[-2], x.shape[-1]]
        ...     def _intermediates_feature(self, i, x, grid, norm, output_fmt):
        ...         return token_features(self.norm(x) if norm else x, grid, 0, output_fmt)[0]
        >>> final, feats = Tokens().forward_intermediates(torch.randn(1, 3, 4, 6), indices=1)
        >>> final.shape, [f.shape for f in feats]
        (torch.Size([1, 24, 3]), [torch.Size([1, 3, 4, 6])])
    """

    intermediates_formats: Tuple[str, ...] = ("NCHW", "NLC")
    intermediates_format_error: str = "Output format must be one of NCHW or NLC."

    if TYPE_CHECKING:  # what the timm model this mixes into has (declared for the type checker only)
        blocks: Any  # a ModuleList or Sequential: sliceable, sized
        norm: Any  # the final norm module

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ``forward_intermediates`` at the input's size.

        Args:
            x: The input image ``[B, C, H, W]``.
            indices: Take the last n feature levels if an int, all if None, those listed if a sequence.
            norm: Apply the model's final norm to the intermediates (where the architecture does).
            stop_early: Stop after the last block taken.
            output_fmt: The intermediates' layout (one of ``intermediates_formats``).
            intermediates_only: Return the intermediates only.

        Returns:
            The intermediates, or the final output and the intermediates.
        """
        final, features = self._forward_intermediates(
            x, indices, norm, stop_early, output_fmt, intermediates_only, self._intermediates_ends()
        )
        return features if intermediates_only else (final, features)

    def _forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]],
        norm: bool,
        stop_early: bool,
        output_fmt: str,
        intermediates_only: bool,
        ends: Optional[Sequence[int]],
    ) -> Tuple[Any, List[Any]]:
        """The loop of every ``forward_intermediates``: ``(final output or None, features)``; ``ends``: the block
        that ends each feature level (None: each block is one)."""
        assert output_fmt in self.intermediates_formats, self.intermediates_format_error
        blocks = self._intermediates_blocks()
        last = len(blocks) - 1
        take_indices, max_index = feature_take_indices(len(blocks) if ends is None else len(ends), indices)
        if ends is not None:
            take_indices = [ends[i] for i in take_indices]
            max_index = ends[max_index]
        x, ctx = self._intermediates_embed(x)
        if stop_early:
            blocks = blocks[: max_index + 1]
        features = []
        i = 0
        for i, block in enumerate(blocks):
            x, ctx = self._intermediates_block(i, block, x, ctx)
            if i in take_indices:
                features.append(self._intermediates_feature(i, x, ctx, norm, output_fmt))
        if intermediates_only:
            return None, features
        return self._intermediates_final(x, ctx, i == last), features

    def _intermediates_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Any]:
        """The input embedded for the first block, and this call's context for the other hooks."""
        raise NotImplementedError

    def _intermediates_blocks(self) -> Union[nn.ModuleList, nn.Sequential, Sequence[Any]]:
        """The blocks (or stages) a feature index counts, in order (sliceable)."""
        return self.blocks

    def _intermediates_ends(self) -> Optional[Sequence[int]]:
        """The block that ends each feature level (timm's ``stage_ends``); None: every block is a level."""
        return None

    def _intermediates_block(self, i: int, block: Any, x: torch.Tensor, ctx: Any) -> Tuple[torch.Tensor, Any]:
        """Block ``i`` run on ``x``; the context after it."""
        return block(x), ctx

    def _intermediates_feature(self, i: int, x: torch.Tensor, ctx: Any, norm: bool, output_fmt: str) -> Any:
        """Block ``i``'s output as a feature in ``output_fmt``."""
        raise NotImplementedError

    def _intermediates_final(self, x: torch.Tensor, ctx: Any, last: bool) -> torch.Tensor:
        """The final output after the blocks that ran (``last``: all of them)."""
        return self.norm(x)


class PrefixTokenIntermediates(Intermediates):
    """:class:`Intermediates` with timm's ``return_prefix_tokens`` (BEiT, TNT): ``_intermediates_feature`` returns
    ``(feature map, prefix tokens)`` pairs, e.g. :func:`token_features`.

    Example:
        >>> import torch.nn as nn
        >>> class ClassToken(PrefixTokenIntermediates, nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.blocks, self.norm = nn.ModuleList([nn.Identity()]), nn.Identity()
        ...     def _intermediates_embed(self, x):
        ...         tokens = x.flatten(2).transpose(1, 2)
        ...         return torch.cat((tokens[:, :1], tokens), dim=1), [x.shape[-2], x.shape[-1]]
        ...     def _intermediates_feature(self, i, x, grid, norm, output_fmt):
        ...         return token_features(x, grid, 1, output_fmt)
        >>> [(f.shape, p.shape) for f, p in ClassToken().forward_intermediates(
        ...     torch.randn(1, 3, 2, 5), return_prefix_tokens=True, intermediates_only=True)]
        [(torch.Size([1, 3, 2, 5]), torch.Size([1, 1, 3]))]
    """

    def forward_intermediates(  # type: ignore[override]  # timm's BEiT/TNT put return_prefix_tokens before norm
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ``forward_intermediates`` at the input's size (argument order as timm's BEiT).

        Args:
            x: The input image ``[B, C, H, W]``.
            indices: Take the last n blocks if an int, all if None, those listed if a sequence.
            return_prefix_tokens: Return ``(feature map, prefix tokens)`` pairs.
            norm: Apply the model's final norm to the intermediates.
            stop_early: Stop after the last block taken.
            output_fmt: ``NCHW`` or ``NLC``.
            intermediates_only: Return the intermediates only.

        Returns:
            The intermediates, or the final output and the intermediates.
        """
        final, pairs = self._forward_intermediates(
            x, indices, norm, stop_early, output_fmt, intermediates_only, self._intermediates_ends()
        )
        features = pairs if return_prefix_tokens else [fmap for fmap, _ in pairs]
        return features if intermediates_only else (final, features)


class TimmIntermediates:
    """Mixin: timm's own ``forward_intermediates`` on the input as the model prepares it for its forward (its
    ``_anysize_input(x)``, e.g. padded to whole windows), for architectures whose timm loop takes any such input
    (MaxxViT, GCViT).

    Example:
        >>> import torch.nn as nn
        >>> class Timm(nn.Module):
        ...     def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
        ...                               intermediates_only=False):
        ...         return [x]
        >>> class Padded(TimmIntermediates, Timm):
        ...     def _anysize_input(self, x):
        ...         return torch.nn.functional.pad(x, (0, 1))
        >>> Padded().forward_intermediates(torch.zeros(1, 3, 4, 5))[0].shape
        torch.Size([1, 3, 4, 6])
    """

    if TYPE_CHECKING:  # the input as the model prepares it for its forward: the family class defines it
        _anysize_input: Callable[[torch.Tensor], torch.Tensor]

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """timm's ``forward_intermediates`` (its arguments, its outputs) on the prepared input, at any size."""
        return super().forward_intermediates(self._anysize_input(x), *args, **kwargs)  # type: ignore[misc]
