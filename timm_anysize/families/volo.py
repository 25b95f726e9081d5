"""VOLO: its ``[1, H, W, C]`` position embedding resampled to the grid after the outlooker stage, cached.

The strided conv stem takes any input size; at the model's own size the path is timm's own, bit for bit.
"""

from typing import List, Optional, Tuple, Union

import torch
from timm.models import volo
from timm.models._features import feature_take_indices  # timm exports it from no public module

from timm_anysize.core.cache import dynamic_image_pos_embed, resample_image_pos
from timm_anysize.core.family import NO_CONV_PATCH, DynamicPath, Family, no_patch_change

__all__ = ["FAMILIES", "DynamicVolo"]


class DynamicVolo(volo.VOLO):
    """timm's VOLO with its ``[1, H, W, C]`` position embedding resampled to the grid after the outlookers."""

    def _anysize_pos(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            pos_embed = resample_image_pos(self.pos_embed, [x.shape[1], x.shape[2]], self._anysize_interpolation,
                                           self._anysize_antialias, True)
        else:
            pos_embed = dynamic_image_pos_embed(self, x.shape[1:3], channels_last=True)
        return self.pos_drop(x + pos_embed)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        for idx, block in enumerate(self.network):
            if idx == 2 and self.pos_embed is not None:  # where timm adds it: after the outlooker stage
                x = self._anysize_pos(x)
            x = block(x)
        B, H, W, C = x.shape
        return x.reshape(B, -1, C)

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
        assert output_fmt in ("NCHW",), "Output format must be NCHW."
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        take_indices = [self.stage_ends[i] for i in take_indices]
        max_index = self.stage_ends[max_index]
        x = self.patch_embed(x).permute(0, 2, 3, 1)  # B,C,H,W-> B,H,W,C
        network = self.network if torch.jit.is_scripting() or not stop_early else self.network[:max_index + 1]
        last_idx = len(self.network) - 1
        idx = 0
        for idx, block in enumerate(network):
            if idx == 2 and self.pos_embed is not None:
                x = self._anysize_pos(x)
            x = block(x)
            if idx in take_indices:
                x_inter = self.norm(x) if norm and idx >= 2 else x
                intermediates.append(x_inter.permute(0, 3, 1, 2))
        if intermediates_only:
            return intermediates
        if idx == last_idx:
            B, H, W, C = x.shape
            x = x.reshape(B, -1, C)
            if self.post_network is not None:
                x = self.forward_cls(x)
            x = self.norm(x)
        return x, intermediates


FAMILIES = (
    Family(
        name="volo",
        dynamic_features=True,
        classes=(volo.VOLO,),
        tensors=(("pos_embed", "pos_nhwc"),),
        unsupported=no_patch_change(NO_CONV_PATCH),
        dynamic_args=(),  # conv stems take any size; enable_dynamic resamples the position embedding
        runtime=DynamicPath(classes={volo.VOLO: DynamicVolo}, patch_layout="none"),
        example="volo_d1_224",
    ),
)
