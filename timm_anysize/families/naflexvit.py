"""NaFlexViT: a ``[1, H, W, C]`` position embedding and an ``nn.Linear`` patch projection (viewed as its conv kernel
when the patch or the channels change); timm's own path runs at any size and pads with ``dynamic_img_pad``."""

import copy
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_patch_embed
from timm.models import naflexvit

from timm_anysize.core.cache import cached_or_inline
from timm_anysize.core.family import Family, TinyModel, gray_and_4ch
from timm_anysize.core.flexi_embed import FlexiEmbed, Size2, make_flexi
from timm_anysize.core.padding import check_multiple

__all__ = ["FAMILIES", "flexi_naflex"]


class _LinearWith(nn.Module):
    """``F.linear`` with a given weight and bias (a PI-resized NaFlexViT projection for one call)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _FlexiNaFlexEmbeds(FlexiEmbed, naflexvit.NaFlexEmbeds):
    """NaFlexViT's embeddings at a run-time patch size: an image input is patchified at the active patch and projected
    with the stored ``nn.Linear`` weight PI-resized as the conv kernel it is (``(ph, pw, C)`` or ``(C, ph, pw)``
    flattened, as timm's ``batch_patchify`` lays patches out); timm's own forward does the rest (its position
    embedding is interpolated to the grid). Pre-patchified (NaFlex) inputs and the built patch take timm's path.
    """

    def kernel(self, p: Size2) -> torch.Tensor:
        """The stored linear weight PI-resized to ``p``, flattened as timm patchifies (cached like the others)."""
        weight = self.proj.weight
        interpolation, antialias = self.kernel_resampling()
        (ph, pw), c = self.patch_size, self.in_chans

        def compute() -> torch.Tensor:
            d = weight.shape[0]
            conv = (
                weight.reshape(d, ph, pw, c).permute(0, 3, 1, 2) if self.channels_last else weight.reshape(d, c, ph, pw)
            )
            conv = resample_patch_embed(conv, list(p), interpolation=interpolation, antialias=antialias)
            return (conv.permute(0, 2, 3, 1) if self.channels_last else conv).reshape(d, -1)

        return cached_or_inline(self.kernel_cache(), (p,), weight, compute)

    def forward(
        self, x: torch.Tensor, patch_coord: Optional[torch.Tensor] = None, patch_valid: Optional[torch.Tensor] = None
    ):
        p = self.active_patch_size()
        if p == tuple(self.patch_size) or patch_coord is not None or not self.is_linear:
            return super().forward(x, patch_coord, patch_valid)
        if not self.dynamic_img_pad and (x.shape[-2] % p[0] or x.shape[-1] % p[1]):
            check_multiple(x.shape[-2:], p, hint="build it with dynamic_img_pad=True (NaFlexViT's own padding)")
        # timm's forward on a shallow view of this module with this call's patch and projection: the module itself
        # is not modified, so threads at other patch sizes do not interfere.
        view = copy.copy(self)
        view.__dict__["patch_size"] = p
        view._modules = {**self._modules, "proj": _LinearWith(self.kernel(p), self.proj.bias)}
        return naflexvit.NaFlexEmbeds.forward(view, x, patch_coord, patch_valid)


def flexi_naflex(embeds: nn.Module) -> nn.Module:
    """Make NaFlexViT's embeddings (``model.embeds``) run at a run-time patch size, in place (its row's
    ``flexi_embed``; :func:`timm_anysize.set_patch_size` is the public way).

    Example:
        >>> import timm
        >>> m = timm.create_model("naflexvit_base_patch16_gap", img_size=32, depth=1, embed_dim=32, num_heads=2)
        >>> flexi_naflex(m.embeds).active_patch_size()
        (16, 16)
    """
    return make_flexi(embeds, _FlexiNaFlexEmbeds)


def _whole_patches(model: nn.Module) -> Tuple[int, int]:
    """With padding off, the patch: timm's NaFlexViT patchifies by a reshape that fails deep inside otherwise."""
    p = model.embeds.patch_size
    return (int(p[0]), int(p[1]))


FAMILIES = (
    Family(
        name="naflexvit",
        dynamic_features=True,
        classes=(naflexvit.NaFlexVit,),
        tensors=(("embeds.pos_embed", "pos_nhwc"),),
        patch_embeds=("embeds",),
        linear_patch="hwc",
        flexi_embed=flexi_naflex,
        first_conv="embeds.proj",
        unpadded_multiple=_whole_patches,  # pad: false: refused at the input, not by timm's patchify reshape
        dynamic="native",
        dynamic_args=("dynamic_img_pad",),  # NaFlexViT runs at any size; padding is its own option
        export_note="timm's patch embedding pads only inputs that are not whole patches, a branch torch.export "
        "keeps as a guard from the example input (e.g. width % 16 == 0), so the program refuses the "
        "other kind of size; torch.compile(dynamic=True) recompiles there instead (tested)",
        example="naflexvit_base_patch16_gap",
        tiny=TinyModel(
            dict(embed_dim=64, depth=2, num_heads=2),
            script_fx="windows",
            script_error="keyword-arg expansion",  # timm's own NaFlexViT does not script (timm's tests skip '*naflex*')
            conformance=gray_and_4ch(
                (96, 160), 144, patch_size=12, model_args=dict(embed_dim=64, depth=3, num_heads=2)
            ),
            multiple=16,
        ),
    ),
)
