"""ConViT: ``pos_embed`` (patch tokens only) resampled as timm's ``resample_abs_pos_embed`` resamples it (a square
variant equals plain timm built at that size), and GPSA's offsets for any grid: timm's for a square grid, the true
``(dx, dy)`` of a non-square one (where timm's own, taken from ``int(N ** 0.5)``, cannot run)."""

from __future__ import annotations

import pytest
import timm
import torch
from test_families import SETUP
from timm.layers import resample_abs_pos_embed
from timm.models import convit

import timm_anysize
from conftest import unique_name
from timm_anysize.families.convit import gpsa_rel_indices

ARCH = "convit_tiny"
ARGS = SETUP["convit"].model_args  # one GPSA block, then one MHSA block


def test_a_square_variant_equals_plain_timm_built_at_that_size(make_checkpoint):
    path, model = make_checkpoint(ARCH, img_size=64, **ARGS)
    name = timm_anysize.register_variant(
        unique_name(),
        base=ARCH,
        model_args=ARGS,
        img_size=96,
        dynamic=False,
        pretrained={"file": str(path), "img_size": 64},
    )
    variant = timm.create_model(name, pretrained=True).eval()
    assert type(variant) is convit.ConVit  # timm's own forward
    sd = dict(model.state_dict())
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=[6, 6], num_prefix_tokens=0)
    reference = timm.create_model(ARCH, img_size=96, **ARGS).eval()
    reference.load_state_dict(sd)
    assert torch.equal(variant.pos_embed, reference.pos_embed)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(variant(x), reference(x))


@pytest.mark.parametrize("side", [1, 4, 7])
def test_square_offsets_are_timms(side):
    gpsa = convit.GPSA(16, num_heads=4)
    assert torch.equal(gpsa_rel_indices([side, side], gpsa.qk.weight), gpsa.get_rel_indices(side * side))


def test_non_square_offsets_are_the_grid_offsets():
    h, w = 3, 5
    rel = gpsa_rel_indices([h, w], torch.zeros(1, dtype=torch.float64))
    assert rel.shape == (1, h * w, h * w, 3) and rel.dtype == torch.float64
    for n in range(h * w):
        for m in range(h * w):
            dx, dy = m % w - n % w, m // w - n // w  # row-major tokens, as timm's patch embedding flattens them
            assert rel[0, n, m].tolist() == [dx, dy, dx * dx + dy * dy]


def test_a_non_square_variant_runs_where_timms_gpsa_cannot_and_equals_timms_math_with_the_true_offsets(make_checkpoint):
    path, _ = make_checkpoint(ARCH, img_size=64, **ARGS)
    spec = dict(base=ARCH, model_args=ARGS, img_size=[96, 64], pretrained={"file": str(path), "img_size": 64})
    dynamic = timm.create_model(timm_anysize.register_variant(unique_name(), **spec), pretrained=True).eval()
    with pytest.raises(timm_anysize.SpecError, match="GPSA relative positions for a square patch grid"):
        timm_anysize.register_variant(unique_name(), dynamic=False, **spec)  # refused at validation, as it fails:
    plain = timm.create_model(ARCH, img_size=[96, 64], **ARGS).eval()  # timm's own model at that size
    plain.load_state_dict(dynamic.state_dict())
    x = torch.randn(2, 3, 96, 64)
    with pytest.raises(RuntimeError):  # timm takes a 4x4 grid for the 24 tokens of 6x4
        plain(x)
    for module in plain.modules():  # timm's GPSA keeps offsets whose count matches the tokens
        if isinstance(module, convit.GPSA):
            module.rel_indices = gpsa_rel_indices([6, 4], module.qk.weight)
    with torch.no_grad():
        assert torch.equal(dynamic(x), plain(x))


def test_offsets_are_cached_per_grid(make_checkpoint):
    path, _ = make_checkpoint(ARCH, img_size=64, **ARGS)
    name = timm_anysize.register_variant(
        unique_name(), base=ARCH, model_args=ARGS, img_size=64, pretrained={"file": str(path), "img_size": 64}
    )
    model = timm.create_model(name, pretrained=True).eval()
    with torch.no_grad():
        for hw in ((64, 96), (64, 96), (80, 64)):
            model(torch.randn(1, 3, *hw))
    info = model.blocks[0].attn._anysize_rel_cache.info()
    assert (info["misses"], info["hits"]) == (2, 1)
    model.train()
    model(torch.randn(1, 3, 64, 96)).sum().backward()  # training reuses the offsets; gradients reach the weights
    assert model.blocks[0].attn._anysize_rel_cache.info()["hits"] == 2
    assert model.pos_embed.grad.abs().sum() > 0 and model.blocks[0].attn.pos_proj.weight.grad.abs().sum() > 0


def test_a_run_time_patch_size_equals_a_variant_built_with_that_patch(make_checkpoint):
    """FlexiViT at run time (``timm_anysize.flexi``): the grid (and so GPSA's offsets) is read off the patch
    embedding's output, whatever the patch of the call."""
    from timm_anysize.flexi import set_patch_size

    path, model = make_checkpoint(ARCH, img_size=64, **ARGS)
    name = timm_anysize.register_variant(
        unique_name(),
        base=ARCH,
        model_args=ARGS,
        img_size=64,
        patch_size=8,
        pretrained={"file": str(path), "img_size": 64},
    )
    built = timm.create_model(name, pretrained=True).eval()
    set_patch_size(model.eval(), 8)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), built(x))
