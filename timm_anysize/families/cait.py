"""CaiT: the position embedding covers patch tokens only (the class token joins after the patch stage); resampled
per grid and cached, and ``forward_intermediates`` at any size."""

from typing import List, Optional, Tuple, Union

import torch
from timm.models import cait
from timm.models._features import feature_take_indices  # timm exports it from no public module

from timm_anysize.core.cache import dynamic_pos_embed, patch_grid, resample_pos_tokens
from timm_anysize.core.family import DynamicPath, Family

__all__ = ["FAMILIES", "DynamicCait"]


class DynamicCait(cait.Cait):
    """timm's CaiT with a cached dynamic position embedding (patch tokens only: the class token joins later)."""

    def _anysize_patch(self) -> List[int]:
        """The patch size of this call: the built one, or a run-time one (:mod:`timm_anysize.flexi`)."""
        ps = self.patch_embed.patch_size
        if not torch.jit.is_scripting():
            if hasattr(self.patch_embed, "active_patch_size"):
                ps = self.patch_embed.active_patch_size()
        return [ps[0], ps[1]]

    def _anysize_pos(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens plus the position embedding of the input's grid (``x``: the image)."""
        grid = patch_grid(x, self._anysize_patch(), self.patch_embed.dynamic_img_pad)
        x = self.patch_embed(x)  # tokens, as timm lays them out
        if torch.jit.is_scripting():
            native = self.patch_embed.grid_size
            pos_embed = resample_pos_tokens(self.pos_embed, grid, [native[0], native[1]], 0,
                                            self._anysize_interpolation, self._anysize_antialias, self._anysize_compat)
        else:
            pos_embed = dynamic_pos_embed(self, grid, prefix=0)
        return self.pos_drop(x + pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not self.dynamic_img_size:
            return super().forward_features(x)
        x = self.blocks(self._anysize_pos(x))
        if self.blocks_token_only is not None:
            x = self.forward_cls(x)
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
        """timm's ``forward_intermediates`` with the position embedding of the input's grid (any size)."""
        assert output_fmt in ("NCHW", "NLC"), "Output format must be one of NCHW or NLC."
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        H, W = patch_grid(x, self._anysize_patch(), self.patch_embed.dynamic_img_pad)
        x = self._anysize_pos(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        for i, blk in enumerate(blocks):
            x = blk(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        if output_fmt == "NCHW":
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if intermediates_only:
            return intermediates
        if self.blocks_token_only is not None:
            x = self.forward_cls(x)
        return self.norm(x), intermediates


FAMILIES = (
    Family(
        name="cait",
        dynamic_features=True,
        classes=(cait.Cait,),
        checkpoint_filter=cait.checkpoint_filter_fn,
        pos_embed_prefix=0,
        dynamic_args=(),  # timm's CaiT has no dynamic-size path; enable_dynamic adds it
        runtime=DynamicPath(classes={cait.Cait: DynamicCait}, patch_layout="tokens"),
        example="cait_xxs24_224",
    ),
)
