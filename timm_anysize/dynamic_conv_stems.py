"""PiT, VOLO and CrossViT at any input size: position embeddings resampled to the grid their conv stems produce,
cached like the ViT one.

Their stems are convolutions that take any input size (PiT's overlapping kernel and VOLO's strided stem keep
whole output positions, dropping a remainder smaller than their stride); timm adds a position embedding of one
fixed grid after them. CrossViT resizes the input to each branch's size; here each branch's size follows the input
(scaled by the branch's ratio, rounded to its patch) instead of being fixed. At the model's own size every path is
timm's own, bit for bit.
"""


from typing import List, Optional, Tuple, Union

import torch
from timm.layers import register_notrace_function
from timm.models import crossvit, pit, volo
from timm.models._features import feature_take_indices  # timm exports it from no public module

from .cache import dynamic_image_pos_embed, dynamic_pos_embed, resample_image_pos, resample_pos_tokens

__all__ = ["DynamicPit", "DynamicVolo", "DynamicCrossVit", "crossvit_branch_size"]


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


@torch.fx.wrap
@register_notrace_function
def crossvit_branch_size(
    x: torch.Tensor, img_size: List[int], scaled: List[int], patch: List[int]
) -> Tuple[int, int]:
    """A CrossViT branch's input size for an image: the branch's ratio to the model's size, rounded to whole patches.

    Example:
        >>> crossvit_branch_size(torch.zeros(1, 3, 360, 300), [240, 240], [224, 224], [16, 16])
        (336, 288)
    """
    H, W = x.shape[-2], x.shape[-1]
    if H == img_size[0] and W == img_size[1]:  # timm's own sizes (the rounding below gives them when patches divide)
        return scaled[0], scaled[1]
    return (max(patch[0], int(round(H * scaled[0] / img_size[0] / patch[0])) * patch[0]),
            max(patch[1], int(round(W * scaled[1] / img_size[1] / patch[1])) * patch[1]))


class DynamicCrossVit(crossvit.CrossVit):
    """timm's CrossViT with each branch at a size that follows the input, and its position embedding resampled."""

    def _embed(self, x: torch.Tensor) -> List[torch.Tensor]:
        B = x.shape[0]
        xs = []
        for i, patch_embed in enumerate(self.patch_embed):
            ps = patch_embed.patch_size
            scaled = self.img_size_scaled[i]
            size = crossvit_branch_size(x, [self.img_size[0], self.img_size[1]], [scaled[0], scaled[1]],
                                        [ps[0], ps[1]])
            x_ = crossvit.scale_image(x, size, self.crop_scale)
            x_ = patch_embed.proj(x_)  # timm's PatchEmbed without its size assert
            grid = [x_.shape[-2], x_.shape[-1]]
            x_ = x_.flatten(2).transpose(1, 2)
            cls_tokens = (self.cls_token_0 if i == 0 else self.cls_token_1).expand(B, -1, -1)
            pos_embed = self.pos_embed_0 if i == 0 else self.pos_embed_1  # hard-coded for torch jit script, as timm
            native = [scaled[0] // ps[0], scaled[1] // ps[1]]
            if torch.jit.is_scripting():
                pos = resample_pos_tokens(pos_embed, grid, native, 1, self._anysize_interpolation,
                                          self._anysize_antialias)
            else:
                pos = dynamic_pos_embed(self, grid, prefix=1, name=f"pos_embed_{i}", native=tuple(native))
            xs.append(self.pos_drop(torch.cat((cls_tokens, x_), dim=1) + pos))
        return xs

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[List[torch.Tensor], List[torch.Tensor]]]:
        """timm's ``forward_intermediates``, reshaped to each branch's grid for this input (timm's reshape uses the
        built size's grid)."""
        out = super().forward_intermediates(x, indices=indices, norm=norm, stop_early=stop_early, output_fmt="NLC",
                                            intermediates_only=intermediates_only)
        if output_fmt != "NCHW":
            return out
        tokens = out if intermediates_only else out[1]
        take_indices, _ = feature_take_indices(self.num_branches * self.num_feature_blocks, indices)
        reshaped = []
        for b, patch_embed in enumerate(self.patch_embed):  # intermediates are branch-major, as timm orders them
            ps, scaled = patch_embed.patch_size, self.img_size_scaled[b]
            h, w = crossvit_branch_size(x, [self.img_size[0], self.img_size[1]], [scaled[0], scaled[1]],
                                        [ps[0], ps[1]])
            count = sum(1 for t in take_indices if t // self.num_feature_blocks == b)
            for y in tokens[len(reshaped):len(reshaped) + count]:
                reshaped.append(y.reshape(x.shape[0], h // ps[0], w // ps[1], -1).permute(0, 3, 1, 2).contiguous())
        return reshaped if intermediates_only else (out[0], reshaped)
