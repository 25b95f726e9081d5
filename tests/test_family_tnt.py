"""TNT: ``patch_pos`` resampled exactly as timm's own ``checkpoint_filter_fn`` resamples it (a variant equals timm's
model at that size loaded through timm's filter), legacy and current layouts, and the dynamic path at any size."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from test_families import SETUP
from timm.models import tnt

import timm_anysize
from conftest import unique_name
from timm_anysize.core.runtime_options import cache_for

ARGS = SETUP["tnt"].model_args


@pytest.mark.parametrize("arch", ["tnt_s_patch16_224", "tnt_s_legacy_patch16_224"])
@pytest.mark.parametrize("img_size", [96, [96, 64]])
def test_a_variant_equals_timm_at_that_size_loaded_through_timms_filter(arch, img_size, make_checkpoint):
    path, model = make_checkpoint(arch, img_size=64, **ARGS)
    name = timm_anysize.register_variant(
        unique_name(), base=arch, model_args=ARGS, img_size=img_size, pretrained={"file": str(path), "img_size": 64}
    )
    variant = timm.create_model(name, pretrained=True).eval()
    reference = timm.create_model(arch, img_size=img_size, **ARGS).eval()
    # timm's filter resamples patch_pos to the model's grid, reading the source grid as square
    reference.load_state_dict(tnt.checkpoint_filter_fn(dict(model.state_dict()), reference))
    assert torch.equal(variant.state_dict()["patch_pos"], reference.patch_pos)
    assert torch.equal(variant.pixel_pos, model.pixel_pos)  # one patch's pixels: no geometry change moves it
    hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        assert torch.equal(variant(x), reference(x))


@pytest.mark.parametrize("arch", ["tnt_s_patch16_224", "tnt_s_legacy_patch16_224"])
def test_the_dynamic_model_at_another_size_equals_the_variant_built_for_it(arch, make_checkpoint):
    path, model = make_checkpoint(arch, img_size=64, **ARGS)
    spec = dict(base=arch, model_args=ARGS, pretrained={"file": str(path), "img_size": 64})
    dynamic = timm.create_model(
        timm_anysize.register_variant(unique_name(), img_size=64, **spec), pretrained=True
    ).eval()
    built = timm.create_model(
        timm_anysize.register_variant(unique_name(), img_size=[80, 112], dynamic=False, **spec), pretrained=True
    ).eval()
    assert type(built) is tnt.TNT
    x = torch.randn(2, 3, 80, 112)
    with torch.no_grad():
        assert torch.equal(dynamic(x), built(x))
        assert torch.equal(dynamic(x[..., :64, :64]), model.eval()(x[..., :64, :64]))  # its own size: timm's


def test_padding_gradients_and_the_cache(make_checkpoint):
    path, _ = make_checkpoint("tnt_s_patch16_224", img_size=64, **ARGS)
    name = timm_anysize.register_variant(
        unique_name(),
        base="tnt_s_patch16_224",
        model_args=ARGS,
        img_size=64,
        pretrained={"file": str(path), "img_size": 64},
    )
    model = timm.create_model(name, pretrained=True).eval()
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        assert torch.equal(model(x), model(F.pad(x, (0, 6, 0, 10))))  # zero-padded bottom/right to whole patches
        model(torch.randn(1, 3, 96, 96))
    cache = cache_for(model, "patch_pos", make=False)
    assert cache is not None
    info = cache.info()
    assert info["misses"] == 2 and info["hits"] == 1  # 80x96 computed once, reused; 96x96 computed
    model(torch.randn(1, 3, 96, 80)).sum().backward()
    assert model.patch_pos.grad is not None and model.patch_pos.grad.abs().sum() > 0


def test_without_padding_an_input_that_is_not_whole_patches_is_refused_with_the_fix(make_checkpoint):
    path, _ = make_checkpoint("tnt_s_patch16_224", img_size=64, **ARGS)
    name = timm_anysize.register_variant(
        unique_name(),
        base="tnt_s_patch16_224",
        model_args=ARGS,
        img_size=64,
        pad=False,
        pretrained={"file": str(path), "img_size": 64},
    )
    model = timm.create_model(name, pretrained=True).eval()
    with pytest.raises(ValueError, match=r"input 70x64 is not a multiple of the patch 16x16.*pad: true"):
        model(torch.randn(1, 3, 70, 64))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 80, 64)).shape == (1, model.num_classes)


def test_a_patch_change_is_refused_at_validation_with_the_reason():
    with pytest.raises(
        timm_anysize.SpecError, match=r"tnt family cannot take patch_(smaller|larger): the patch size sets TNT's pixels"
    ):
        timm_anysize.register_variant(
            unique_name(),
            base="tnt_s_patch16_224",
            model_args=ARGS,
            img_size=64,
            patch_size=8,
            pretrained={"img_size": 64},
        )


def test_a_size_that_is_not_whole_patches_is_rejected_with_the_nearest_that_work(make_checkpoint):
    """timm's unfold silently drops the pixels past the last whole patch (and the patch cannot change)."""
    _, model = make_checkpoint("tnt_s_patch16_224", img_size=64, **ARGS)
    at_70 = timm.create_model("tnt_s_patch16_224", img_size=[70, 64], **ARGS).eval()
    at_70.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 70, 64)
    with torch.no_grad():
        assert torch.equal(at_70(x), model.eval()(x[:, :, :64]))  # the last 6 rows never reach the model
    with pytest.raises(
        timm_anysize.SpecError,
        match=r"tnt cannot run at \[70, 64\]: the pixel embedding gets \[70, "
        r"64\] px, and its height 70 is not a multiple of its patch 16; "
        r"nearest heights that work: 64 or 80",
    ):
        timm_anysize.register_variant(
            unique_name(), base="tnt_s_patch16_224", model_args=ARGS, img_size=[70, 64], pretrained={"img_size": 64}
        )
    for near in (64, 80):
        name = timm_anysize.register_variant(
            unique_name(), base="tnt_s_patch16_224", model_args=ARGS, img_size=[near, 64], pretrained={"img_size": 64}
        )
        with torch.no_grad():
            assert timm.create_model(name).eval()(torch.randn(1, 3, near, 64)).shape == (1, 1000)
