"""torchvision checkpoints (ViT, Swin, Swin V2) load into any-size timm variants with torchvision's own numbers."""

from __future__ import annotations

import pytest
import timm
import torch
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

import timm_anysize
from conftest import unique_name
from timm_anysize.core.errors import WeightsError

VIT_ARGS = dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (torchvision zero-initialises class tokens and heads); buffers are derived."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.parameters():
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return model.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def tv_vit(image_size: int = 32, seed: int = 0, **kw) -> VisionTransformer:
    return randomize(
        VisionTransformer(
            image_size=image_size,
            patch_size=8,
            num_layers=2,
            num_heads=2,
            hidden_dim=64,
            mlp_dim=128,
            num_classes=10,
            **kw,
        ),
        seed,
    )


def variant(path, img_size, base="vit_base_patch16_224", model_args=VIT_ARGS, **kw):
    name = unique_name("tv")
    pretrained = {"file": str(path), "img_size": kw.pop("src_img", 32), "num_classes": kw.pop("src_classes", 10)}
    if "patch_size" in kw:
        pretrained["patch_size"] = kw["patch_size"]
    pretrained.update(kw.pop("pretrained", {}))
    timm_anysize.register_variant(
        name,
        base=base,
        img_size=img_size,
        num_classes=kw.pop("num_classes", 10),
        model_args=dict(model_args),
        pretrained=pretrained,
        **kw,
    )
    return name


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    src = tv_vit()
    path = tmp_path_factory.mktemp("tv") / "vit.pth"
    torch.save({"model": src.state_dict(), "epoch": 3}, path)  # torchvision references' training checkpoint
    return src, path


def test_vit_same_geometry_and_report(vit_file):
    src, path = vit_file
    m = timm.create_model(
        variant(path, 32, patch_size=8, adapt={"pos_embed": {"compat": "torchvision"}}), pretrained=True
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel(m(x), src(x)) <= 1e-5
    report = timm_anysize.adaptation_report(m)
    assert report.origin["layout"] == "torchvision.vit"
    assert report.origin["wrappers"] == ["'model' entry (ignored: epoch)"]
    assert "q/k/v fused" in report.entries["blocks.0.attn.qkv.weight"].detail
    assert "encoder.layers.encoder_layer_1.ln_2.weight" in report.entries["blocks.1.norm2.weight"].detail
    assert len(report.entries) == len(m.state_dict())


@pytest.mark.parametrize("size", [48, 24])
def test_vit_compat_torchvision_matches_interpolate_embeddings(vit_file, size):
    src, path = vit_file
    ref = tv_vit(size)
    ref.load_state_dict(interpolate_embeddings(size, 8, src.state_dict()))
    m = timm.create_model(
        variant(path, size, patch_size=8, dynamic=False, adapt={"pos_embed": {"compat": "torchvision"}}),
        pretrained=True,
    ).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert rel(m(x), ref(x)) <= 1e-5
        assert torch.equal(m.pos_embed, ref.encoder.pos_embedding)  # the same resampling, bit for bit
    # timm's own (antialiased) resampling is measurably another model
    plain = timm.create_model(variant(path, size, patch_size=8, dynamic=False), pretrained=True).eval()
    assert not torch.allclose(plain.pos_embed, ref.encoder.pos_embedding, atol=1e-4)


def test_vit_compat_at_run_time_and_non_square(vit_file):
    """The dynamic forward resamples like torchvision too; non-square sizes (torchvision has none) agree with a
    variant built at that size."""
    src, path = vit_file
    dyn = timm.create_model(
        variant(path, 32, patch_size=8, adapt={"pos_embed": {"compat": "torchvision"}}), pretrained=True
    ).eval()
    ref = tv_vit(48)
    ref.load_state_dict(interpolate_embeddings(48, 8, src.state_dict()))
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert rel(dyn(x), ref(x)) <= 1e-5
        built = timm.create_model(
            variant(path, (24, 48), patch_size=8, dynamic=False, adapt={"pos_embed": {"compat": "torchvision"}}),
            pretrained=True,
        ).eval()
        y = torch.randn(1, 3, 24, 48)
        assert torch.equal(dyn(y), built(y))


def test_vit_pre_logits_needs_a_new_head(tmp_path):
    src = tv_vit(representation_size=32)
    path = tmp_path / "vit_rep.pth"
    torch.save(src.state_dict(), path)
    with pytest.raises(WeightsError, match="pre_logits.*new head"):
        timm.create_model(variant(path, 32, patch_size=8), pretrained=True)
    m = timm.create_model(variant(path, 32, patch_size=8, num_classes=0), pretrained=True).eval()
    report = timm_anysize.adaptation_report(m)
    assert "heads.pre_logits.weight" in report.dropped and "heads.head.weight" in report.dropped
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # the features before pre_logits are torchvision's
        feats = src.encoder(torch.cat([src.class_token, src._process_input(x)], 1))[:, 0]
        assert rel(m(x), feats) <= 1e-5


def test_vit_layout_of_another_family_is_refused(vit_file):
    _, path = vit_file
    with pytest.raises(WeightsError, match="torchvision.vit.*family vit.*swin"):
        timm.create_model(
            variant(
                path,
                32,
                base="swin_tiny_patch4_window7_224",
                model_args=dict(embed_dim=32, depths=(1, 1), num_heads=(2, 2)),
            ),
            pretrained=True,
        )


SWIN_ARGS = dict(embed_dim=32, depths=(1, 2, 1, 1), num_heads=(2, 2, 4, 4))


def tv_swin(v2: bool, seed: int = 0) -> SwinTransformer:
    extra = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    return randomize(
        SwinTransformer(
            patch_size=[4, 4],
            embed_dim=32,
            depths=[1, 2, 1, 1],
            num_heads=[2, 2, 4, 4],
            window_size=[8, 8] if v2 else [7, 7],
            num_classes=10,
            **extra,
        ),
        seed,
    )


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin_v2"])  # not family rows: torchvision's models
def test_swin(tmp_path, v2):
    src = tv_swin(v2)
    path = tmp_path / "swin.safetensors"
    import safetensors.torch

    safetensors.torch.save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    base = "swinv2_tiny_window8_256" if v2 else "swin_tiny_patch4_window7_224"
    size = 256 if v2 else 224
    args = {**SWIN_ARGS, "window_size": 8 if v2 else 7}
    m = timm.create_model(variant(path, size, base=base, model_args=args, src_img=size), pretrained=True).eval()
    report = timm_anysize.adaptation_report(m)
    assert report.origin["layout"] == ("torchvision.swin_v2" if v2 else "torchvision.swin")
    if v2:
        assert "torchvision zeroes it" in report.dropped["features.1.0.attn.qkv.bias"]
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert rel(m(x), src(x)) <= 1e-5
        # Swin has no absolute position embedding: torchvision runs the same weights at any multiple of the
        # window; so does the variant at a larger and a non-square size.
        for shape in ((2 * size, 2 * size), (size, 2 * size)):
            big = timm.create_model(
                variant(path, shape, base=base, model_args=args, src_img=size, dynamic=False), pretrained=True
            ).eval()
            y = torch.randn(1, 3, *shape)
            assert rel(big(y), src(y)) <= 1e-5


def test_cli_convert_writes_a_plain_timm_checkpoint(vit_file, tmp_path, capsys):
    import json

    import safetensors.torch

    from timm_anysize.apps.cli import main

    src, path = vit_file
    out = tmp_path / "vit_timm.safetensors"
    assert (
        main(
            [
                "convert",
                str(path),
                "--base",
                "vit_base_patch16_224",
                "--img-size",
                "32",
                "--patch-size",
                "8",
                "--model-args",
                json.dumps(VIT_ARGS),
                "--to",
                str(out),
            ]
        )
        == 0
    )
    assert "layout: torchvision.vit" in capsys.readouterr().out
    plain = timm.create_model("vit_base_patch16_224", img_size=32, patch_size=8, num_classes=10, **VIT_ARGS).eval()
    plain.load_state_dict(safetensors.torch.load_file(str(out)), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert rel(plain(x), src(x)) <= 1e-5
    assert json.loads(out.with_suffix(".report.json").read_text())["origin"]["layout"] == "torchvision.vit"


def test_show_prints_the_layout_and_mapping(vit_file, capsys):
    from timm_anysize.apps.cli import main

    _, path = vit_file
    name = variant(path, 48, patch_size=8)
    assert main(["show", name]) == 0
    out = capsys.readouterr().out
    assert "# checkpoint layout: torchvision.vit" in out
    assert "cls_token <- torchvision 'class_token'" in out


def test_unknown_layout_lists_the_closest(tmp_path):
    sd = tv_vit().state_dict()
    sd["encoder.extra_thing"] = torch.ones(1)
    path = tmp_path / "odd.pth"
    torch.save(sd, path)
    for layout in ("auto", "torchvision"):  # nothing guessed, detected or named
        with pytest.raises(
            WeightsError,
            match=r"no known layout fits.*tried: (dino.vit, mmpretrain.vit, mmpretrain.swin, )?torchvision.vit, .*closest: "
            r"torchvision.vit \(unexpected: encoder.extra_thing\)",
        ):
            timm.create_model(variant(path, 32, patch_size=8, pretrained={"layout": layout}), pretrained=True)
    # keys no layout's signature recognises: timm's own layout, whose error names the layouts tried too
    del sd["class_token"], sd["encoder.extra_thing"]
    torch.save(sd, path)
    from timm_anysize.core.errors import AdaptationError

    with pytest.raises(
        AdaptationError,
        match=r"checkpoint layouts tried: timm, dino.vit, mmpretrain.vit, mmpretrain.swin, torchvision.vit.*closest "
        r"other than "
        r"timm: torchvision.vit",
    ):
        timm.create_model(variant(path, 32, patch_size=8), pretrained=True)


def test_export_is_plain_timm_and_card_names_the_layout(vit_file, tmp_path):
    import subprocess
    import sys

    _, path = vit_file
    m = timm.create_model(
        variant(path, 48, patch_size=8, dynamic=False, adapt={"pos_embed": {"compat": "torchvision"}}), pretrained=True
    ).eval()
    out = timm_anysize.export(m, tmp_path / "exp")
    assert "torchvision.vit layout" in (out / "README.md").read_text()
    code = (
        "import timm, torch, safetensors.torch as st; "
        f"m = timm.create_model('local-dir:{out}', pretrained=True).eval(); "
        f"sd = st.load_file('{out}/model.safetensors'); "
        "assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items()); print('ok')"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "ok\n"
