"""Visformer: one ``[1, C, H, W]`` position embedding per stage, each resampled to the grid its stage sees
(at load time from the weights' size, and per input size at run time, cached).

timm adds each stage's embedding as a fixed-size tensor (its cfg marks the model ``fixed_input_size``); the
stems and stages are convolutions and attention over any grid. At the model's own size the path is timm's own,
bit for bit.
"""

from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models import visformer
from timm.models._features import feature_take_indices  # timm exports it from no public module
from timm.models._manipulate import checkpoint_seq  # timm's checkpoint wrapper (as its own Visformer forward)

from timm_anysize.core.cache import dynamic_image_pos_embed, resample_image_pos
from timm_anysize.core.family import DynamicPath, Family, no_patch_change

__all__ = ["FAMILIES", "DynamicVisformer"]


class DynamicVisformer(visformer.Visformer):
    """timm's Visformer with each stage's position embedding resampled to the grid of the input."""

    def _add_pos(self, x: torch.Tensor, pos_embed: Optional[torch.Tensor], name: str) -> torch.Tensor:
        """``x`` plus the stage's position embedding at ``x``'s grid (timm's own at its native grid)."""
        if pos_embed is None:
            return x
        if torch.jit.is_scripting():
            if x.shape[-2] != pos_embed.shape[-2] or x.shape[-1] != pos_embed.shape[-1]:
                pos_embed = resample_image_pos(pos_embed, [x.shape[-2], x.shape[-1]], self._anysize_interpolation,
                                               self._anysize_antialias, False)
        else:
            pos_embed = self._eager_pos(x, name)
        return self.pos_drop(x + pos_embed)

    @torch.jit.unused
    def _eager_pos(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return dynamic_image_pos_embed(self, x.shape[-2:], channels_last=False, name=name)

    def _stages(self) -> list:
        """``(patch embedding, position embedding, its name, stage)`` per stage (for ``forward_intermediates``)."""
        return [(self.patch_embed1, self.pos_embed1, "pos_embed1", self.stage1),
                (self.patch_embed2, self.pos_embed2, "pos_embed2", self.stage2),
                (self.patch_embed3, self.pos_embed3, "pos_embed3", self.stage3)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``forward_features`` (same operations, unrolled as timm's for TorchScript) with the position
        embeddings of the input's grid."""
        if self.stem is not None:
            x = self.stem(x)
        x = self._add_pos(self.patch_embed1(x), self.pos_embed1, "pos_embed1")
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stage1, x)
        else:
            x = self.stage1(x)
        if self.patch_embed2 is not None:
            x = self._add_pos(self.patch_embed2(x), self.pos_embed2, "pos_embed2")
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stage2, x)
        else:
            x = self.stage2(x)
        if self.patch_embed3 is not None:
            x = self._add_pos(self.patch_embed3(x), self.pos_embed3, "pos_embed3")
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stage3, x)
        else:
            x = self.stage3(x)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ``forward_intermediates`` with the position embeddings of the input's grid (any size)."""
        assert output_fmt in ("NCHW",), "Output shape must be NCHW."
        intermediates = []
        stages = self._stages()
        last_idx = len(stages) - 1
        take_indices, max_index = feature_take_indices(len(stages), indices)
        if stop_early:
            stages = stages[:max_index + 1]
        if self.stem is not None:
            x = self.stem(x)
        feat_idx = 0
        for feat_idx, (patch_embed, pos_embed, name, stage) in enumerate(stages):
            if patch_embed is not None:
                x = self._add_pos(patch_embed(x), pos_embed, name)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == last_idx else x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return x, intermediates


def enable_visformer_dynamic(model: nn.Module, cache_size: int) -> None:
    """Let the stage patch embeddings take any grid (timm's assert the size they were built for), padding a grid
    that is not whole patches bottom/right (timm's ``dynamic_img_pad``) unless ``enable_dynamic(pad=False)``."""
    for pe in (model.patch_embed1, model.patch_embed2, model.patch_embed3):
        if pe is not None:
            pe.strict_img_size = False
            pe.dynamic_img_pad = model._anysize_dynamic.pad


FAMILIES = (
    Family(
        name="visformer",
        dynamic_features=True,
        classes=(visformer.Visformer,),
        tensors=(("pos_embed1", "pos_nchw"), ("pos_embed2", "pos_nchw"), ("pos_embed3", "pos_nchw")),
        patch_embeds=(),
        unsupported=no_patch_change("Visformer's patch is a 7x7 stride-2 conv stem followed by a strided patch "
                                    "convolution; there is no single patch kernel to resize"),
        dynamic_args=(),  # timm's Visformer has no dynamic-size path; enable_dynamic adds it
        runtime=DynamicPath(classes={visformer.Visformer: DynamicVisformer}, setup=enable_visformer_dynamic,
                            patch_layout="none"),
        example="visformer_tiny",
    ),
)
