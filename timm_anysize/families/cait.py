"""CaiT: the position embedding covers patch tokens only (the class token joins after the patch stage); resampled
per grid and cached, and ``forward_intermediates`` at any size."""

from typing import List, Tuple

import torch
from timm.models import cait

from timm_anysize.core.cache import patch_grid
from timm_anysize.core.family import DynamicPath, Family, TinyModel, gray_and_4ch
from timm_anysize.core.intermediates import Intermediates, token_features
from timm_anysize.core.runtime_options import RuntimeOptionsMixin

__all__ = ["FAMILIES", "DynamicCait"]


class DynamicCait(RuntimeOptionsMixin, Intermediates, cait.Cait):
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
        native = self.patch_embed.grid_size
        pos_embed = self.pos_tokens_at(self.pos_embed, grid, [native[0], native[1]], 0)
        return self.pos_drop(x + pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not self.dynamic_img_size:
            return super().forward_features(x)
        x = self.blocks(self._anysize_pos(x))
        if self.blocks_token_only is not None:
            x = self.forward_cls(x)
        return self.norm(x)

    def _intermediates_embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        grid = patch_grid(x, self._anysize_patch(), self.patch_embed.dynamic_img_pad)
        return self._anysize_pos(x), grid

    def _intermediates_feature(
        self, i: int, x: torch.Tensor, grid: List[int], norm: bool, output_fmt: str
    ) -> torch.Tensor:
        return token_features(self.norm(x) if norm else x, grid, 0, output_fmt)[0]  # the class token joins later

    def _intermediates_final(self, x: torch.Tensor, grid: List[int], last: bool) -> torch.Tensor:
        if self.blocks_token_only is not None:
            x = self.forward_cls(x)
        return self.norm(x)


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
        tiny=TinyModel(
            dict(embed_dim=64, depth=2, num_heads=2, depth_token_only=1),
            script_fx="tokens",
            conformance=gray_and_4ch(
                (96, 160), 144, patch_size=12, model_args=dict(embed_dim=64, depth=3, num_heads=2, depth_token_only=1)
            ),
            multiple=16,
        ),
    ),
)
