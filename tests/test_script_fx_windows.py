"""The window / stage families under TorchScript, FX, forward_intermediates at any size, torch.compile, torch.export
and ONNX: each equals the eager dynamic model (a registered variant, and ``enable_dynamic`` on a timm model -- or,
for the families that timm itself makes dynamic, the timm model) at the variant's size and at other, non-square
sizes (Swin: also sizes whose windows need padding)."""

from __future__ import annotations

import pytest
import timm
import torch
from script_fx import (
    assert_compiled_equals_eager,
    assert_exports_equal_eager,
    assert_fx_equals_eager,
    assert_fx_features_equal_module_outputs,
    assert_scripted_equals_eager,
    dynamic_and_built,
    inputs,
    models,
    sizes,
    variant,
)

import timm_anysize  # noqa: F401  (registers the variants)
from timm_anysize.apps.docs import families_markdown
from timm_anysize.families import FAMILIES

FAMS = [f for f in FAMILIES if f.tiny.script_fx == "windows"]  # the rows that name this module
ids = [f.name for f in FAMS]


@pytest.mark.parametrize("fam", FAMS, ids=ids)
def test_torchscript_equals_eager(fam, ckpt_dir):
    if fam.name == "naflexvit":  # timm's own NaFlexViT does not script (its test suite excludes '*naflex*')
        with pytest.raises(torch.jit.frontend.NotSupportedError, match="keyword-arg expansion"):
            torch.jit.script(models(fam.name, ckpt_dir)[1])
        return
    assert_scripted_equals_eager(fam.name, ckpt_dir)


@pytest.mark.parametrize("fam", FAMS, ids=ids)
def test_fx_trace_equals_eager(fam, ckpt_dir):
    assert_fx_equals_eager(fam.name, ckpt_dir)


# timm's Twins and MViTv2 name their feature modules 'block.k' (the modules are 'blocks.k' / 'stages.k'): plain
# timm's own fx/hook feature extractors fail on them too (pinned below), so they have no fx feature model to compare.
FX_FEATURE_FAMS = [f for f in FAMS if f.name not in ("twins", "mvitv2")]


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        ("twins_pcpvt_small", dict(embed_dims=(32, 64, 128, 256), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))),
        ("mvitv2_tiny", {}),
    ],
)
def test_timm_feature_info_names_modules_that_do_not_exist(arch, kwargs):
    model = timm.create_model(arch, pretrained=False, **kwargs)
    assert model.feature_info[0]["module"] == "block.0"
    with pytest.raises(ValueError, match="'block.0' is not present"):
        timm.create_model(arch, pretrained=False, features_only=True, feature_cls="fx", **kwargs)


@pytest.mark.parametrize("fam", FX_FEATURE_FAMS, ids=[f.name for f in FX_FEATURE_FAMS])
def test_fx_feature_model_equals_eager_modules(fam, ckpt_dir):
    """``features_only=True, feature_cls='fx'``: each feature is the eager dynamic model's module output."""
    assert_fx_features_equal_module_outputs(fam.name, ckpt_dir, fam.tiny.feature_indices)


def test_levit_forward_intermediates_at_another_size_equal_a_model_built_for_it(ckpt_dir):
    """At a size other than the variant's, LeViT's intermediates (and features_only) equal those of a timm model
    built at that size with the variant's weights resampled to it (a static variant of them at that size)."""
    other = sizes("levit")[1]
    dynamic, built = dynamic_and_built("levit", ckpt_dir, other)
    x = torch.randn(2, 3, *other)
    with torch.no_grad():
        final, inter = dynamic.forward_intermediates(x)
        final_built, inter_built = built.forward_intermediates(x)
        feats = timm.create_model(variant("levit", ckpt_dir), pretrained=True, features_only=True).eval()(x)
    assert torch.equal(final, final_built)
    assert len(inter) == len(inter_built) == 3 and all(torch.equal(a, b) for a, b in zip(inter, inter_built))
    assert len(feats) == 3 and all(torch.equal(a, b) for a, b in zip(feats, inter))


@pytest.mark.parametrize("fam", FAMS, ids=ids)
def test_forward_intermediates_run_at_other_sizes(fam, ckpt_dir):
    """Every family's forward_intermediates runs at a size other than the variant's, its last feature the one
    forward_features gives there (timm's contract)."""
    model = models(fam.name, ckpt_dir)[0]
    x = inputs(fam.name)[1]
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
    assert len(inter) > 0 and all(torch.isfinite(t).all() for t in inter)


# torch.compile(dynamic=True), torch.export with dynamic H/W and ONNX: three sizes each.


# The Swin families' export_note: symbolic H x W does not finish; they compile one graph per size.
STATIC_COMPILE = ("swin", "swinv2", "swinv2_cr")


# Twins: one symbolic graph takes about a minute of a core to capture, and its local attention's window count (7x7
# windows, padded) is a guard: at the default sizes it recompiled at each (3 minutes). It is checked at three sizes
# of one window count instead (the own size, a larger one, one that is not whole patches), asserting one graph.
ONE_GRAPH = {"twins": [(96, 64), (112, 80), (90, 70)]}


@pytest.mark.parametrize("fam", FAMS, ids=ids)
def test_compile_dynamic_equals_eager(fam, ckpt_dir):
    at = ONE_GRAPH.get(fam.name)
    assert_compiled_equals_eager(
        fam.name, ckpt_dir, dynamic=fam.name not in STATIC_COMPILE, at=at, graphs=1 if at else None
    )


@pytest.mark.parametrize("fam", [f for f in FAMS if not f.export_note], ids=lambda f: f.name)
def test_torch_export_and_onnx_dynamic_height_width(fam, ckpt_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    assert_exports_equal_eager(fam.name, ckpt_dir, None if fam.onnx_note else tmp_path / "m.onnx")


def test_a_family_that_cannot_export_says_why():
    """Each family left out above has its reason in docs/families.md."""
    assert {f.name for f in FAMS if f.export_note} == {"swin", "swinv2", "swinv2_cr", "levit", "twins", "naflexvit"}
    assert {f.name for f in FAMS if f.onnx_note} == {"mvitv2"}
    table = families_markdown()
    assert all(f"no: {f.export_note}" in table for f in FAMS if f.export_note)
    assert all(f"torch.export yes; ONNX no: {f.onnx_note}" in table for f in FAMS if f.onnx_note)
