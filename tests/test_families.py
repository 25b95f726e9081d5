"""The family coverage matrix: one small model per family x every geometry change, each cell passing exact checks
or declared unsupported (and then rejected at validation); docs/families.md is kept in sync with the table."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from conftest import unique_name

import timm_anysize
from timm_anysize.families import FAMILIES, GEOMETRY_CHANGES, UNSUPPORTED, families_markdown

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(embed_dim=64, depth=2, num_heads=2)
# Per family: model args that shrink the example, and the size its checkpoint is trained at.
SETUP = {
    "vit": ({}, 160),  # test_vit is already tiny
    "deit_distilled": (SMALL, 64),
    "eva": (SMALL, 56),
    "beit": (SMALL, 64),
    "cait": (dict(SMALL, depth_token_only=1), 64),
}


def test_every_family_has_a_matrix_row():
    assert set(SETUP) == {f.name for f in FAMILIES}


def test_docs_families_is_in_sync():
    assert (ROOT / "docs" / "families.md").read_text() == families_markdown()


def change_spec(change: str, size: int, patch: int) -> dict:
    return {
        "img_larger": dict(img_size=size + 2 * patch),
        "img_non_square": dict(img_size=[size + 2 * patch, size - patch]),
        "patch_smaller": dict(patch_size=patch // 2),
        "patch_larger": dict(patch_size=2 * patch) if size % (2 * patch) == 0 else dict(img_size=2 * size, patch_size=2 * patch),
        "in_chans_1": dict(in_chans=1),
        "in_chans_4": dict(in_chans=4),
    }[change]


@pytest.fixture
def family_checkpoint(make_checkpoint):
    def make(family):
        args, size = SETUP[family.name]
        path, base = make_checkpoint(family.example, img_size=size, **args)
        return path, base, args, size

    return make


@pytest.mark.parametrize("change", list(GEOMETRY_CHANGES))
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_matrix_cell(family, change, family_checkpoint):
    path, base, args, size = family_checkpoint(family)
    patch = base.patch_embed.patch_size[0]
    spec = dict(base=family.example, model_args=args, pretrained={"file": str(path), "img_size": size},
                **change_spec(change, size, patch))
    if (family.name, change) in UNSUPPORTED:
        with pytest.raises(timm_anysize.SpecError, match=family.name):
            timm_anysize.register_variant(unique_name(), **spec)
        return
    name = timm_anysize.register_variant(unique_name(), **spec)
    torch.manual_seed(0)
    fresh = timm.create_model(name).state_dict()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=True).eval()
    loaded, report = model.state_dict(), timm_anysize.adaptation_report(model)
    assert set(report.entries) == set(loaded)  # every tensor accounted for
    for key, entry in report.entries.items():
        if entry.action != "initialized":  # nothing silently left at its fresh init
            assert not torch.equal(loaded[key], fresh[key]), key
    assert report.non_copied(), "a geometry change must change something"
    c, h, w = model.pretrained_cfg["input_size"]
    sizes = [(h, w)]
    if timm_anysize.is_dynamic(model):
        sizes += [(h + 2 * model.patch_embed.patch_size[0], w), (h, w + 3 * model.patch_embed.patch_size[1] + 1)]
    with torch.no_grad():
        for hw in sizes:
            out = model(torch.randn(2, c, *hw))
            assert out.shape == (2, model.num_classes or model.num_features) and torch.isfinite(out).all(), hw


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_same_geometry_is_bit_identical(family, family_checkpoint):
    path, base, args, size = family_checkpoint(family)
    name = timm_anysize.register_variant(unique_name(), base=family.example, model_args=args, img_size=size,
                                         pretrained={"file": str(path), "img_size": size})
    model = timm.create_model(name, pretrained=True).eval()
    assert timm_anysize.adaptation_report(model).non_copied() == []
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("family", [f for f in FAMILIES if not f.supports_dynamic], ids=lambda f: f.name)
def test_families_without_dynamic_size_say_so_at_validation(family):
    args, size = SETUP[family.name]
    with pytest.raises(timm_anysize.SpecError, match=rf"\.dynamic: the {family.name} family cannot run at any input size"):
        timm_anysize.register_variant(unique_name(), base=family.example, model_args=args, img_size=size, dynamic=True)
    name = timm_anysize.register_variant(unique_name(), base=family.example, model_args=args, img_size=size)
    assert timm.create_model(name).pretrained_cfg["fixed_input_size"] is True  # defaults to what it supports
