"""SAM / ViTDet image encoders (``samvit_*``): a variant at another size is timm's own base run at that size (timm
resamples the NHWC position embedding and the global relative-position tables on every forward), checkpoints in
SAM's own layout load through timm's filter, and the dynamic path pads and keeps gradients."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from test_families import SETUP
from timm.layers import resample_abs_pos_embed_nhwc

import timm_anysize
from conftest import unique_name

ARCH = "samvit_base_patch16"
ARGS = SETUP["samvit"].model_args  # global attention in block 1, 2x2-token windows in block 0


@pytest.fixture
def base(make_checkpoint):
    return make_checkpoint(ARCH, img_size=64, **ARGS)


def _timm_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """timm's ``get_rel_pos`` resize of a ``[2n - 1, C]`` table, step for step."""
    out = F.interpolate(table.reshape(1, table.shape[0], -1).permute(0, 2, 1), size=length, mode="linear")
    return out.reshape(-1, length).permute(1, 0)


@pytest.mark.parametrize("img_size", [[96, 64], [128, 128], [48, 80]])
def test_a_variant_is_timm_running_the_base_at_that_size(base, img_size):
    path, model = base
    name = timm_anysize.register_variant(
        unique_name(), base=ARCH, model_args=ARGS, img_size=img_size, pretrained={"file": str(path), "img_size": 64}
    )
    variant = timm.create_model(name, pretrained=True).eval()
    grid = [s // 16 for s in img_size]
    sd, src = variant.state_dict(), model.state_dict()
    assert torch.equal(sd["pos_embed"], resample_abs_pos_embed_nhwc(src["pos_embed"], grid))
    for axis, n in (("h", grid[0]), ("w", grid[1])):
        key = f"blocks.1.attn.rel_pos_{axis}"  # the global block: 2 * grid - 1 entries
        assert sd[key].shape[0] == 2 * n - 1
        torch.testing.assert_close(sd[key], _timm_rel_pos(src[key], 2 * n - 1), rtol=0, atol=0)
        assert torch.equal(sd[f"blocks.0.attn.rel_pos_{axis}"], src[f"blocks.0.attn.rel_pos_{axis}"])  # windowed
    x = torch.randn(2, 3, *img_size)
    with torch.no_grad():
        assert torch.equal(variant(x), model.eval()(x))


def test_a_checkpoint_in_sams_own_layout_loads_through_timms_filter(base, tmp_path):
    """segment-anything's ``image_encoder.*`` names (``mlp.lin1``), prompt encoder and mask decoder keys beside them."""
    path, model = base
    sam = {"image_encoder." + k.replace("mlp.fc", "mlp.lin"): v for k, v in model.state_dict().items()}
    sam["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 8)
    sam["mask_decoder.iou_token.weight"] = torch.randn(1, 8)
    torch.save(sam, tmp_path / "sam_vit.pth")
    name = timm_anysize.register_variant(
        unique_name(),
        base=ARCH,
        model_args=ARGS,
        img_size=[96, 64],
        pretrained={"file": str(tmp_path / "sam_vit.pth"), "img_size": 64},
    )
    variant = timm.create_model(name, pretrained=True).eval()
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        assert torch.equal(variant(x), model.eval()(x))


def test_inputs_that_are_not_whole_patches_are_padded_and_gradients_reach_the_position_embedding(base):
    path, _ = base
    name = timm_anysize.register_variant(
        unique_name(), base=ARCH, model_args=ARGS, img_size=64, pretrained={"file": str(path), "img_size": 64}
    )
    model = timm.create_model(name, pretrained=True).eval()
    assert timm_anysize.is_dynamic(model)
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        assert torch.equal(model(x), model(F.pad(x, (0, 6, 0, 10))))  # zero-padded bottom/right to whole patches
    model(torch.randn(1, 3, 96, 80)).sum().backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0


def test_without_padding_an_input_that_is_not_whole_patches_is_refused_with_the_fix(base):
    path, _ = base
    name = timm_anysize.register_variant(
        unique_name(),
        base=ARCH,
        model_args=ARGS,
        img_size=64,
        pad=False,
        pretrained={"file": str(path), "img_size": 64},
    )
    model = timm.create_model(name, pretrained=True).eval()
    with pytest.raises(ValueError, match=r"input 70x64 is not a multiple of the patch 16x16.*pad: true"):
        model(torch.randn(1, 3, 70, 64))


def test_a_patch_change_resizes_the_kernel_and_keeps_the_window_tables(base):
    path, model = base
    name = timm_anysize.register_variant(
        unique_name(),
        base=ARCH,
        model_args=ARGS,
        img_size=64,
        patch_size=8,
        pretrained={"file": str(path), "img_size": 64},
    )
    variant = timm.create_model(name, pretrained=True).eval()
    entries = timm_anysize.adaptation_report(variant).entries
    assert entries["patch_embed.proj.weight"].action == "resampled"
    assert entries["pos_embed"].detail.startswith("grid 4x4 -> 8x8")
    assert entries["blocks.1.attn.rel_pos_h"].detail == "relative-position axis 7 -> 15 entries (linear)"
    assert entries["blocks.0.attn.rel_pos_h"].action == "copied"
    with torch.no_grad():
        assert torch.isfinite(variant(torch.randn(1, 3, 64, 64))).all()


def test_a_run_time_patch_size_equals_a_variant_built_with_that_patch(base):
    """FlexiViT at run time (``timm_anysize.flexi``): the kernel PI-resized per call, the grid read off the output."""
    from timm_anysize.flexi import set_patch_size

    path, model = base
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
