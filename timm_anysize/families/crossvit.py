"""CrossViT: each branch's size follows the input (scaled by the branch's ratio, rounded to its patch) instead of
being fixed, and each branch's token position embedding is resampled to its grid (cached like the ViT one).

timm resizes the input to each branch's fixed size. At the model's own size the path is timm's own, bit for bit.
"""

from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import register_notrace_function
from timm.models import crossvit

from timm_anysize.core.family import DynamicPath, Family, TinyModel, gray_and_4ch, no_patch_change
from timm_anysize.core.intermediates import tokens_to_nchw
from timm_anysize.core.runtime_options import RuntimeOptionsMixin
from timm_anysize.core.spec import Size2
from timm_anysize.core.timm_private import feature_take_indices

__all__ = ["FAMILIES", "DynamicCrossVit", "crossvit_branch_size"]


@torch.fx.wrap
@register_notrace_function
def crossvit_branch_size(x: torch.Tensor, img_size: List[int], scaled: List[int], patch: List[int]) -> Tuple[int, int]:
    """A CrossViT branch's input size for an image: the branch's ratio to the model's size, rounded to whole patches.

    Example:
        >>> crossvit_branch_size(torch.zeros(1, 3, 360, 300), [240, 240], [224, 224], [16, 16])
        (336, 288)
    """
    H, W = x.shape[-2], x.shape[-1]
    if H == img_size[0] and W == img_size[1]:  # timm's own sizes (the rounding below gives them when patches divide)
        return scaled[0], scaled[1]
    return (
        max(patch[0], int(round(H * scaled[0] / img_size[0] / patch[0])) * patch[0]),
        max(patch[1], int(round(W * scaled[1] / img_size[1] / patch[1])) * patch[1]),
    )


class DynamicCrossVit(RuntimeOptionsMixin, crossvit.CrossVit):
    """timm's CrossViT with each branch at a size that follows the input, and its position embedding resampled."""

    def _embed(self, x: torch.Tensor) -> List[torch.Tensor]:
        B = x.shape[0]
        xs = []
        for i, patch_embed in enumerate(self.patch_embed):
            ps = patch_embed.patch_size
            scaled = self.img_size_scaled[i]
            size = crossvit_branch_size(x, [self.img_size[0], self.img_size[1]], [scaled[0], scaled[1]], [ps[0], ps[1]])
            x_ = crossvit.scale_image(x, size, self.crop_scale)
            x_ = patch_embed.proj(x_)  # timm's PatchEmbed without its size assert
            grid = [x_.shape[-2], x_.shape[-1]]
            x_ = x_.flatten(2).transpose(1, 2)
            cls_tokens = (self.cls_token_0 if i == 0 else self.cls_token_1).expand(B, -1, -1)
            pos_embed = self.pos_embed_0 if i == 0 else self.pos_embed_1  # hard-coded for torch jit script, as timm
            native = [scaled[0] // ps[0], scaled[1] // ps[1]]
            pos = self.pos_tokens_at(pos_embed, grid, native, 1, "pos_embed_0" if i == 0 else "pos_embed_1")
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
        built size's grid). Its own loop, not :class:`~timm_anysize.core.intermediates.Intermediates`: a feature
        index names a (branch, block) pair, branch-major, each branch on its own grid."""
        out = super().forward_intermediates(
            x,
            indices=indices,
            norm=norm,
            stop_early=stop_early,
            output_fmt="NLC",
            intermediates_only=intermediates_only,
        )
        if output_fmt != "NCHW":
            return out
        tokens = out if intermediates_only else out[1]
        take_indices, _ = feature_take_indices(self.num_branches * self.num_feature_blocks, indices)
        reshaped: list[torch.Tensor] = []
        for b, patch_embed in enumerate(self.patch_embed):  # intermediates are branch-major, as timm orders them
            ps, scaled = patch_embed.patch_size, self.img_size_scaled[b]
            h, w = crossvit_branch_size(x, [self.img_size[0], self.img_size[1]], [scaled[0], scaled[1]], [ps[0], ps[1]])
            count = sum(1 for t in take_indices if t // self.num_feature_blocks == b)
            for y in tokens[len(reshaped) : len(reshaped) + count]:
                reshaped.append(tokens_to_nchw(y, [h // ps[0], w // ps[1]]))
        return reshaped if intermediates_only else (out[0], reshaped)  # type: ignore[return-value]  # timm: out typed a union


def _crossvit_branch_sizes(model: nn.Module, img_size: Size2) -> tuple[tuple[str, Size2, Size2], ...]:
    """Each CrossViT branch embeds the input resized by its scale (``int(size * scale)``, as timm computes it) in
    whole patches of its own size; the scales are read off the built model."""
    out = []
    for i, pe in enumerate(model.patch_embed):
        scale = [s / b for s, b in zip(model.img_size_scaled[i], model.img_size)]
        size = tuple(int(x * r) for x, r in zip(img_size, scale))
        out.append((f"branch {i} (input x {scale[0]:.4g}, patch {pe.patch_size[0]})", size, tuple(pe.patch_size)))
    return tuple(out)  # type: ignore[return-value]


FAMILIES = (
    Family(
        name="crossvit",
        dynamic_features=True,
        classes=(crossvit.CrossVit,),
        tensors=(("pos_embed_0", "pos_tokens"), ("pos_embed_1", "pos_tokens")),
        pos_embed_prefix=1,  # each branch has its own class token (cls_token_0/1)
        patch_embeds=("patch_embed.0", "patch_embed.1"),
        unsupported=no_patch_change("CrossViT has one patch size per branch, which a single patch_size cannot express"),
        export_note="each branch's size is rounded from the input size (Python round of a ratio), a guard that "
        "torch.export cannot keep symbolic; torch.compile recompiles per size instead",
        dynamic_args=(),  # enable_dynamic sizes each branch from the input
        runtime=DynamicPath(classes={crossvit.CrossVit: DynamicCrossVit}, patch_layout="none"),
        size_multiples=_crossvit_branch_sizes,
        example="crossvit_tiny_240",
        tiny=TinyModel(
            dict(embed_dim=[32, 64], depth=[[1, 1, 0]], num_heads=[1, 1]),
            img_size=120,
            step=120,
            feature_indices=(0,),
            script_fx="tokens",  # a block per branch
            other_sizes=((360, 240), (200, 280)),  # branch sizes follow the input: any size runs
            export_error="Constraints violated",  # see export_note
            conformance=gray_and_4ch(
                (120, 240), 360, model_args=dict(embed_dim=[32, 64], depth=[[1, 1, 0]] * 3, num_heads=[1, 1])
            ),
        ),  # timm wants 3 levels
    ),
)
