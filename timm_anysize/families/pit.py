"""PiT: its ``[1, C, H, W]`` position embedding resampled to the grid its (overlapping) conv stem produces, cached.

The stem takes any input size, keeping whole output positions; timm adds a position embedding of one fixed grid
after it. At the model's own size the path is timm's own, bit for bit.
"""

from typing import List, Optional, Tuple, Union

import torch
from timm.models import pit
from timm.models._features import feature_take_indices  # timm exports it from no public module

from timm_anysize.core.cache import dynamic_image_pos_embed, resample_image_pos
from timm_anysize.core.family import DynamicPath, Family, no_patch_change

__all__ = ["FAMILIES", "DynamicPit"]


class DynamicPit(pit.PoolingVisionTransformer):
    """timm's PiT with its ``[1, C, H, W]`` position embedding resampled to the stem's output grid."""

    def _anysize_pos(self, x: torch.Tensor) -> torch.Tensor:
        """The stem's output plus the position embedding of its grid."""
        x = self.patch_embed(x)
        if torch.jit.is_scripting():
            pos_embed = resample_image_pos(self.pos_embed, [x.shape[-2], x.shape[-1]], self._anysize_interpolation,
                                           self._anysize_antialias, False)
        else:
            pos_embed = dynamic_image_pos_embed(self, x.shape[-2:], channels_last=False)
        return self.pos_drop(x + pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._anysize_pos(x)
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        x, cls_tokens = self.transformers((x, cls_tokens))
        return self.norm(cls_tokens)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ``forward_intermediates`` with the position embedding of the input's grid (any size)."""
        assert output_fmt in ("NCHW",), "Output shape must be NCHW."
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.transformers), indices)
        x = self._anysize_pos(x)
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        last_idx = len(self.transformers) - 1
        stages = self.transformers if torch.jit.is_scripting() or not stop_early else self.transformers[:max_index + 1]
        feat_idx = 0
        for feat_idx, stage in enumerate(stages):
            x, cls_tokens = stage((x, cls_tokens))
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            cls_tokens = self.norm(cls_tokens)
        return cls_tokens, intermediates


FAMILIES = (
    Family(
        name="pit",
        dynamic_features=True,
        classes=(pit.PoolingVisionTransformer,),
        tensors=(("pos_embed", "pos_nchw"),),
        unsupported=no_patch_change(
            "PiT's patch kernel overlaps (stride = patch / 2); resizing it changes what a token sees"
        ),
        dynamic_args=(),  # conv stems take any size; enable_dynamic resamples the position embedding
        runtime=DynamicPath(classes={pit.PoolingVisionTransformer: DynamicPit}, patch_layout="none"),
        example="pit_ti_224",
    ),
)
