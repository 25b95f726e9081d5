"""DINO / DINOv2 training checkpoints, and the ``dino`` compat preset against DINO's published resampling."""

from __future__ import annotations

import argparse
import math

import pytest
import timm
import torch
import torch.nn as nn
from test_naflex import naflex_batch
from test_origins_torchvision import randomize, rel

import timm_anysize
from conftest import unique_name

ARGS = dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0)


def dino_interpolate_pos_encoding(pos_embed: torch.Tensor, patch_size: int, npatch: int, w: int, h: int):
    """facebookresearch/dino vision_transformer.py VisionTransformer.interpolate_pos_encoding, verbatim but for
    ``self``; ``w, h`` are dims 2 and 3 of the input, as DINO names them."""
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    # we add a small number to avoid floating point error in the interpolation
    # see discussion at https://github.com/facebookresearch/dino/issues/8
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def dino_forward(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """DINO's prepare_tokens + blocks + norm, class token out (its VisionTransformer.forward)."""
    B, nc, w, h = x.shape
    t = backbone.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat((backbone.cls_token.expand(B, -1, -1), t), dim=1)
    t = t + dino_interpolate_pos_encoding(backbone.pos_embed, 8, t.shape[1] - 1, w, h)
    for blk in backbone.blocks:
        t = blk(t)
    return backbone.norm(t)[:, 0]


@pytest.fixture(scope="module")
def dino_ckpt(tmp_path_factory):
    teacher = randomize(timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, num_classes=0, **ARGS), 1)
    student = randomize(timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, num_classes=0, **ARGS), 2)
    head = {
        "head.mlp.0.weight": torch.randn(32, 64),
        "head.last_layer.weight_g": torch.randn(100, 1),
        "head.last_layer.weight_v": torch.randn(100, 32),
    }
    ckpt = {
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **head},
        "student": {
            **{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
            **{f"module.{k}": v for k, v in head.items()},
        },
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=8),
    }
    path = tmp_path_factory.mktemp("dino") / "checkpoint.pth"
    torch.save(ckpt, path)
    return path, teacher.eval(), student.eval()


def variant(path, img_size, **kw):
    name = unique_name("dino")
    timm_anysize.register_variant(
        name,
        base="vit_small_patch16_224",
        img_size=img_size,
        patch_size=8,
        num_classes=0,
        model_args=ARGS,
        pretrained={"file": str(path), "img_size": 32, "patch_size": 8, "num_classes": 0, **kw.pop("pretrained", {})},
        adapt={"pos_embed": {"compat": "dino"}},
        **kw,
    )
    return name


def test_teacher_by_default_student_on_request(dino_ckpt):
    path, teacher, student = dino_ckpt
    x = torch.randn(2, 3, 32, 32)
    m = timm.create_model(variant(path, 32), pretrained=True).eval()
    report = timm_anysize.adaptation_report(m)
    assert report.origin["layout"] == "dino.vit"
    assert report.origin["wrappers"][0].startswith("'teacher'")
    assert "projection head" in report.dropped["head.last_layer.weight_g"]
    s = timm.create_model(variant(path, 32, pretrained={"select": "student"}), pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(m(x), teacher(x)) and torch.equal(s(x), student(x))


@pytest.mark.parametrize("size", [(48, 48), (24, 24), (24, 48), (56, 40)])
def test_compat_dino_reproduces_dino_interpolate_pos_encoding(dino_ckpt, size):
    path, teacher, _ = dino_ckpt
    y = torch.randn(1, 3, *size)
    with torch.no_grad():
        want = dino_forward(teacher, y)
        dyn = timm.create_model(variant(path, 32), pretrained=True).eval()  # run time
        assert rel(dyn(y), want) <= 1e-5
        built = timm.create_model(variant(path, size, dynamic=False), pretrained=True).eval()  # load time
        assert rel(built(y), want) <= 1e-5


def test_a_dino_checkpoint_as_naflexvit_gives_dinos_forward_on_each_image(dino_ckpt):
    """``use_naflex=True`` on a DINO checkpoint (issue 31): each image of a padded NaFlex batch gets DINO's own
    forward on that image alone, its scale-factor resampling of the position grid included."""
    path, teacher, _ = dino_ckpt
    naflex = timm.create_model(variant(path, 32), pretrained=True, use_naflex=True).eval()
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(3, *hw, generator=gen) for hw in [(48, 48), (24, 48), (56, 40), (32, 32)]]
    with torch.no_grad():
        out = naflex(naflex_batch(images, 8, 60))
        for got, img in zip(out, images):
            assert rel(got[None], dino_forward(teacher, img[None])) <= 1e-5
