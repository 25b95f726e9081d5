"""The ``big_vision`` compat preset against big_vision's published ``resample_posemb`` (scipy.ndimage.zoom, order 1)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import timm
import torch
from test_origins_torchvision import randomize, rel

import timm_anysize
from conftest import save_checkpoint, unique_name

# big_vision's ViTs pool without a class token ("gap" / "map"): the position embedding is the patch grid alone.
ARGS = dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, class_token=False, global_pool="avg")


def big_vision_resample_posemb(old: np.ndarray, new_grid: tuple[int, int]) -> np.ndarray:
    """big_vision models/vit.py ``resample_posemb``, verbatim but for the zoom per axis (big_vision's grids are
    square: ``gs_new / gs_old`` on both) and numpy out."""
    gs_old = int(np.sqrt(old.shape[1]))
    grid = old.reshape(gs_old, gs_old, -1)
    zoom = (new_grid[0] / gs_old, new_grid[1] / gs_old, 1)
    grid = scipy.ndimage.zoom(grid, zoom, order=1)
    return grid.reshape(1, new_grid[0] * new_grid[1], -1)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    model = randomize(timm.create_model("vit_base_patch16_224", img_size=32, patch_size=8, num_classes=10, **ARGS))
    return save_checkpoint(model, tmp_path_factory.mktemp("bv") / "w.safetensors"), model


def variant(path, img_size, compat: str = "big_vision", **kw) -> str:
    return timm_anysize.register_variant(
        unique_name("bv"),
        base="vit_base_patch16_224",
        img_size=img_size,
        patch_size=8,
        num_classes=10,
        model_args=ARGS,
        adapt={"pos_embed": {"compat": compat}},
        pretrained={"file": str(path), "img_size": 32, "patch_size": 8, "num_classes": 10},
        **kw,
    )


@pytest.mark.parametrize("size", [(48, 48), (24, 24), (24, 48), (56, 40)])
def test_compat_big_vision_reproduces_resample_posemb(source, size):
    path, model = source
    grid = (size[0] // 8, size[1] // 8)
    want_pe = torch.from_numpy(big_vision_resample_posemb(model.pos_embed.detach().numpy(), grid))
    # big_vision's own resampled model: the weights with its resampled embedding, at the new size
    origin = timm.create_model("vit_base_patch16_224", img_size=size, patch_size=8, num_classes=10, **ARGS).eval()
    origin.load_state_dict({**model.state_dict(), "pos_embed": want_pe})
    built = timm.create_model(variant(path, list(size), dynamic=False), pretrained=True).eval()  # load time
    assert rel(built.pos_embed.detach(), want_pe) <= 1e-6
    dyn = timm.create_model(variant(path, 32), pretrained=True).eval()  # run time
    y = torch.randn(2, 3, *size)
    with torch.no_grad():
        want = origin(y)
        assert rel(built(y), want) <= 1e-5
        assert rel(dyn(y), want) <= 1e-5
        timm_default = timm.create_model(variant(path, list(size), "timm", dynamic=False), pretrained=True).eval()
        assert rel(timm_default(y), want) > 1e-3  # timm's bicubic is another function: the preset matters
