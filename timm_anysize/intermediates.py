"""``forward_intermediates`` of the dynamic classes that keep timm's own intermediates path (CaiT, PiT, VOLO, LeViT,
Hiera): at the size the model was built for it is timm's; at another size a clear error instead of a shape mismatch.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["IntermediatesAtOwnSize"]


class IntermediatesAtOwnSize:
    """For dynamic classes whose ``forward_intermediates`` is timm's fixed-size path: a clear error at other sizes.

    ``forward`` and ``forward_features`` of these classes run at any size; timm's ``forward_intermediates`` adds
    the embeddings of the size the model was built for, so at another size it fails on a shape, which is re-raised
    saying so.
    """

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        try:
            return super().forward_intermediates(x, *args, **kwargs)  # type: ignore[misc]
        except RuntimeError as e:
            raise ValueError(
                f"{type(self).__name__}.forward_intermediates follows timm's path, which runs at the size the model "
                f"was built for; got {x.shape[-2]}x{x.shape[-1]} (forward and forward_features run at any size)"
            ) from e
