"""SAM / ViTDet image encoders (timm's ``VisionTransformerSAM``, ``samvit_*``): an absolute ``[1, H, W, C]`` position
embedding and, in the global-attention blocks, decomposed relative positions per axis (``rel_pos_h`` / ``rel_pos_w``,
``2 * grid - 1`` entries each); the windowed blocks' tables are sized by the window (in tokens), which no geometry
change touches.

At load time the position embedding is resampled to the target grid (bicubic with antialias, as timm's forward
resamples it) and each global table resized linearly to its axis (as timm's ``get_rel_pos`` resizes it), so a variant
built for a size computes what the base computes at that size. timm's forward already resamples both on every call
but asserts whole patches; here the position embedding is resampled with the variant's options and cached per grid,
inputs that are not whole patches are padded (``pad``), and the global tables stay timm's (``get_rel_pos``, resized
per call: a few thousand numbers). At the model's own size every path is timm's own, bit for bit.
"""

from typing import Tuple

import torch
import torch.nn as nn
from timm.models import checkpoint, checkpoint_seq, vision_transformer_sam

from timm_anysize.core.family import DynamicPath, Family, TinyModel, gray_and_4ch
from timm_anysize.core.intermediates import Intermediates
from timm_anysize.core.runtime_options import RuntimeOptionsMixin

__all__ = ["FAMILIES", "DynamicVisionTransformerSAM"]


class DynamicVisionTransformerSAM(RuntimeOptionsMixin, Intermediates, vision_transformer_sam.VisionTransformerSAM):
    """timm's VisionTransformerSAM with its NHWC position embedding resampled to the input's grid (cached)."""

    intermediates_formats = ("NCHW",)
    intermediates_format_error = "Output shape for ViT-SAM must be NCHW."

    def _anysize_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding (padded to whole patches where ``pad``) plus the position embedding of its grid."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.image_pos_at(self.pos_embed, [x.shape[1], x.shape[2]], True)
        x = self.pos_drop(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._anysize_embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.neck(x.permute(0, 3, 1, 2))

    def _intermediates_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return self._anysize_embed(x), None

    def _intermediates_block(self, i: int, blk: nn.Module, x: torch.Tensor, ctx: None) -> Tuple[torch.Tensor, None]:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(blk, x), ctx
        return blk(x), ctx

    def _intermediates_feature(self, i: int, x: torch.Tensor, ctx: None, norm: bool, output_fmt: str) -> torch.Tensor:
        # norm is intertwined with the neck's convs (timm applies both)
        return self.neck(x.permute(0, 3, 1, 2)) if norm else x.permute(0, 3, 1, 2)

    def _intermediates_final(self, x: torch.Tensor, ctx: None, last: bool) -> torch.Tensor:
        return self.neck(x.permute(0, 3, 1, 2))


FAMILIES = (
    Family(
        name="samvit",
        dynamic_features=True,
        classes=(vision_transformer_sam.VisionTransformerSAM,),
        checkpoint_filter=vision_transformer_sam.checkpoint_filter_fn,  # SAM's image_encoder.* names; no resampling
        tensors=(("pos_embed", "pos_nhwc"), ("*.rel_pos_h", "rel_axis"), ("*.rel_pos_w", "rel_axis")),
        dynamic_args=(),  # timm's constructor has no dynamic_img_size; enable_dynamic pads and caches
        runtime=DynamicPath(classes={vision_transformer_sam.VisionTransformerSAM: DynamicVisionTransformerSAM}),
        export_note="timm's window partition pads the grid to whole windows and views it by the padded size; "
        "torch.export cannot keep that symbolic in H and W (a guard fails)",
        example="samvit_base_patch16",
        tiny=TinyModel(
            dict(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=[1], window_size=2, neck_chans=32),
            script_fx="fsam",
            compile_skip="torch.compile(dynamic=True) equals eager at the three sizes (checked once) but takes minutes "
            "on 2 cores: symbolic shapes through timm's window padding",
            conformance=gray_and_4ch(
                (96, 160),
                144,
                patch_size=12,
                model_args=dict(
                    embed_dim=64, depth=3, num_heads=2, global_attn_indexes=[2], window_size=2, neck_chans=32
                ),
            ),
            multiple=16,
        ),
    ),
)
