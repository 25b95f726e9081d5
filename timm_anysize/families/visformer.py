"""Visformer: one ``[1, C, H, W]`` position embedding per stage, each resampled to the grid its stage sees
(at load time from the weights' size, and per input size at run time, cached).

timm adds each stage's embedding as a fixed-size tensor (its cfg marks the model ``fixed_input_size``); the
stems and stages are convolutions and attention over any grid. At the model's own size the path is timm's own,
bit for bit.
"""

from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.models import checkpoint_seq, visformer

from timm_anysize.core.family import DynamicPath, Family, TinyModel, gray_and_4ch, no_patch_change
from timm_anysize.core.intermediates import Intermediates
from timm_anysize.core.runtime_options import RuntimeOptions, RuntimeOptionsMixin, runtime_options

__all__ = ["FAMILIES", "DynamicVisformer"]


class DynamicVisformer(RuntimeOptionsMixin, Intermediates, visformer.Visformer):
    """timm's Visformer with each stage's position embedding resampled to the grid of the input."""

    intermediates_formats = ("NCHW",)
    intermediates_format_error = "Output shape must be NCHW."

    def _add_pos(self, x: torch.Tensor, pos_embed: Optional[torch.Tensor], name: str) -> torch.Tensor:
        """``x`` plus the stage's position embedding at ``x``'s grid (timm's own at its native grid)."""
        if pos_embed is None:
            return x
        if not torch.jit.is_scripting() or x.shape[-2] != pos_embed.shape[-2] or x.shape[-1] != pos_embed.shape[-1]:
            pos_embed = self.image_pos_at(pos_embed, [x.shape[-2], x.shape[-1]], False, name)
        return self.pos_drop(x + pos_embed)

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

    def _intermediates_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return (self.stem(x) if self.stem is not None else x), None

    def _intermediates_blocks(self) -> list:
        """``(patch embedding, position embedding, its name, stage)`` per stage."""
        return [
            (self.patch_embed1, self.pos_embed1, "pos_embed1", self.stage1),
            (self.patch_embed2, self.pos_embed2, "pos_embed2", self.stage2),
            (self.patch_embed3, self.pos_embed3, "pos_embed3", self.stage3),
        ]

    def _intermediates_block(self, i: int, stage: tuple, x: torch.Tensor, ctx: None) -> Tuple[torch.Tensor, None]:
        patch_embed, pos_embed, name, blocks = stage
        if patch_embed is not None:
            x = self._add_pos(patch_embed(x), pos_embed, name)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(blocks, x), ctx
        return blocks(x), ctx

    def _intermediates_feature(self, i: int, x: torch.Tensor, ctx: None, norm: bool, output_fmt: str) -> torch.Tensor:
        return self.norm(x) if norm and i == 2 else x  # the norm follows the last stage (stage3)

    def _intermediates_final(self, x: torch.Tensor, ctx: None, last: bool) -> torch.Tensor:
        return self.norm(x) if last else x


def enable_visformer_dynamic(model: nn.Module, options: RuntimeOptions) -> None:
    """Let the stage patch embeddings take any grid (timm's assert the size they were built for), padding a grid
    that is not whole patches bottom/right (timm's ``dynamic_img_pad``) unless ``enable_dynamic(pad=False)``."""
    for pe in (model.patch_embed1, model.patch_embed2, model.patch_embed3):
        if pe is not None:
            pe.strict_img_size = False
            pe.dynamic_img_pad = runtime_options(model).pad


def _whole_stage_patches(model: nn.Module) -> Tuple[int, int]:
    """With padding off, the input multiple its stage patch embeddings need: the stem stride times their patches
    (the model's last reduction, 32 for timm's Visformers)."""
    r = int(model.feature_info[-1]["reduction"])
    return (r, r)


FAMILIES = (
    Family(
        name="visformer",
        dynamic_features=True,
        classes=(visformer.Visformer,),
        tensors=(("pos_embed1", "pos_nchw"), ("pos_embed2", "pos_nchw"), ("pos_embed3", "pos_nchw")),
        patch_embeds=(),
        unsupported=no_patch_change(
            "Visformer's patch is a 7x7 stride-2 conv stem followed by a strided patch "
            "convolution; there is no single patch kernel to resize"
        ),
        dynamic_args=(),  # timm's Visformer has no dynamic-size path; enable_dynamic adds it
        runtime=DynamicPath(
            classes={visformer.Visformer: DynamicVisformer}, setup=enable_visformer_dynamic, patch_layout="none"
        ),
        unpadded_multiple=_whole_stage_patches,  # pad: false: refused at the input, not by a stage's assert
        example="visformer_tiny",
        tiny=TinyModel(
            dict(embed_dim=48, depth=(1, 1, 1), num_heads=2, init_channels=16),
            step=32,
            script_fx="tokens",
            # measured 2026-12-07: two graphs (one recompile), 76 s of CI's 2 cores, the suite's slowest compile
            compile_skip="torch.compile(dynamic=True) equals eager at the three sizes (checked once: two graphs, "
            "76 s on 2 cores) but costs more than CI's budget: each stage pads its patch grid and resamples its own "
            "position embedding on the symbolic size; torch.export with a dynamic height and width and ONNX are tested",
            conformance=gray_and_4ch((96, 160), 144),
            multiple=32,
        ),
    ),
)
