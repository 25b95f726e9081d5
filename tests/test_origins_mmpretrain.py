"""MMPretrain classifiers (ViT, DeiT, Swin) load into any-size timm variants with MMPretrain's own numbers."""

from __future__ import annotations

import pytest
import timm
import torch

pytest.importorskip("mmpretrain")
from mmpretrain.registry import MODELS  # noqa: E402
from test_origins_torchvision import randomize, rel  # noqa: E402

import timm_anysize  # noqa: E402
from conftest import unique_name  # noqa: E402

ARCH = dict(embed_dims=64, num_layers=2, num_heads=2, feedforward_channels=128)
VIT_ARGS = dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0)


def build(backbone: str, head: str):
    return randomize(
        MODELS.build(
            dict(
                type="ImageClassifier",
                backbone=dict(type=backbone, arch=ARCH, img_size=32, patch_size=8),
                neck=None,
                head=dict(type=head, num_classes=10, in_channels=64),
            )
        )
    )


def save(model, path):
    torch.save({"meta": {"epoch": 3}, "state_dict": model.state_dict()}, path)  # mmengine's checkpoint layout
    return path


def variant(path, img_size, base, model_args=VIT_ARGS, **kw):
    name = unique_name("mm")
    timm_anysize.register_variant(
        name,
        base=base,
        img_size=img_size,
        num_classes=10,
        model_args=dict(model_args),
        pretrained={
            "file": str(path),
            "img_size": kw.pop("src", 32),
            "num_classes": 10,
            **({"patch_size": 8} if "swin" not in base else {}),  # not family rows: timm architecture names
        },
        **({"patch_size": 8} if "swin" not in base else {}),  # not family rows: timm architecture names
        **kw,
    )
    return name


@pytest.mark.parametrize("kind", ["vit", "deit"])  # not family rows: MMPretrain's model kinds
def test_vit_and_deit_with_compat(tmp_path, kind):
    backbone, head, base = {
        "vit": ("VisionTransformer", "VisionTransformerClsHead", "vit_base_patch16_224"),  # not family rows: kinds
        "deit": ("DistilledVisionTransformer", "DeiTClsHead", "deit_base_distilled_patch16_224"),
    }[kind]
    src = build(backbone, head)
    path = save(src, tmp_path / "mm.pth")
    compat = {"pos_embed": {"compat": "mmpretrain"}}
    m = timm.create_model(variant(path, 32, base, adapt=compat), pretrained=True).eval()
    report = timm_anysize.adaptation_report(m)
    assert report.origin["layout"] == "mmpretrain.vit"
    assert report.origin["wrappers"] == ["'state_dict' entry (ignored: meta)"]
    for size in [(32, 32), (48, 48), (24, 24), (24, 48)]:
        y = torch.randn(1, 3, *size)
        with torch.no_grad():
            want = src(y, mode="tensor")  # MMPretrain resizes its position embedding at every forward
            assert rel(m(y), want) <= 1e-5, size
            if size != (32, 32):
                built = timm.create_model(
                    variant(path, size, base, adapt=compat, dynamic=False), pretrained=True
                ).eval()
                assert rel(built(y), want) <= 1e-5, size


def test_swin(tmp_path):
    src = randomize(
        MODELS.build(
            dict(
                type="ImageClassifier",
                backbone=dict(
                    type="SwinTransformer",
                    arch=dict(embed_dims=32, depths=[1, 2, 1, 1], num_heads=[2, 2, 4, 4]),
                    img_size=224,
                ),
                neck=dict(type="GlobalAveragePooling"),
                head=dict(type="LinearClsHead", num_classes=10, in_channels=256),
            )
        )
    )
    path = save(src, tmp_path / "swin.pth")
    args = dict(embed_dim=32, depths=(1, 2, 1, 1), num_heads=(2, 2, 4, 4))
    for size in [(224, 224), (224, 448)]:
        m = timm.create_model(
            variant(path, size, "swin_tiny_patch4_window7_224", model_args=args, src=224, dynamic=False),
            pretrained=True,
        ).eval()
        y = torch.randn(1, 3, *size)
        with torch.no_grad():
            assert rel(m(y), src(y, mode="tensor")) <= 1e-5, size
    assert "nn.Unfold" in timm_anysize.adaptation_report(m).entries["layers.1.downsample.reduction.weight"].detail
