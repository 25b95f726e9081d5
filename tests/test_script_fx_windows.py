"""The window / stage families under TorchScript, FX, forward_intermediates at any size, torch.compile, torch.export
and ONNX: each equals the eager dynamic model (a registered variant, and ``enable_dynamic`` on a timm model -- or,
for the families that timm itself makes dynamic, the timm model) at the variant's size and at other, non-square
sizes (Swin: also sizes whose windows need padding).

The rows are those whose ``TinyModel.script_fx`` is ``"windows"``: every check runs on every row, but where the row's
field says why not (a skip with that reason, or the check the field names instead)."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from script_fx import (
    assert_compiled_equals_eager,
    assert_equals_built_at_another_size,
    assert_exports_equal_eager,
    assert_fx_equals_eager,
    assert_fx_features_equal_module_outputs,
    assert_notes_are_documented_and_errors_raised,
    assert_scripted_equals_eager,
    cells,
    group,
    inputs,
    models,
)

import timm_anysize  # noqa: F401  (registers the variants)
from conftest import tiny_arch

FAMS = group("windows")
ids = [f.name for f in FAMS]


@pytest.mark.parametrize("fam", FAMS, ids=ids)
def test_torchscript_equals_eager(fam, ckpt_dir):
    assert_scripted_equals_eager(fam.name, ckpt_dir)


@pytest.mark.parametrize("fam", FAMS, ids=ids)
def test_fx_trace_equals_eager(fam, ckpt_dir):
    assert_fx_equals_eager(fam.name, ckpt_dir)


@pytest.mark.parametrize("fam", [f for f in FAMS if f.tiny.fx_features_note], ids=lambda f: f.name)
def test_timm_feature_info_names_modules_that_do_not_exist(fam):
    """The rows whose ``fx_features_note`` says so (timm's Twins and MViTv2 name their feature modules 'block.k'):
    plain timm's own fx feature extractor fails on them too, so they have no fx feature model to compare."""
    args = dict(img_size=fam.tiny.img_size) if fam.tiny.img_size_arg else {}
    model = timm.create_model(tiny_arch(fam), pretrained=False, **args, **fam.tiny.model_args)
    first = model.feature_info[0]["module"]
    assert first not in dict(model.named_modules())
    with pytest.raises(ValueError, match=f"'{re.escape(first)}' is not present"):
        timm.create_model(
            tiny_arch(fam), pretrained=False, features_only=True, feature_cls="fx", **args, **fam.tiny.model_args
        )


@pytest.mark.parametrize("fam", cells(FAMS, lambda f: f.tiny.fx_features_note))
def test_fx_feature_model_equals_eager_modules(fam, ckpt_dir):
    """``features_only=True, feature_cls='fx'``: each feature is the eager dynamic model's module output."""
    assert_fx_features_equal_module_outputs(fam.name, ckpt_dir, fam.tiny.feature_indices)


@pytest.mark.parametrize("fam", cells(FAMS, lambda f: f.tiny.built_note))
def test_forward_intermediates_at_another_size_equal_a_model_built_for_it(fam, ckpt_dir):
    """At a size other than the variant's, the outputs, intermediates (one per stage) and features_only equal those
    of a timm model built at that size with the variant's weights resampled to it (a static variant of them)."""
    assert_equals_built_at_another_size(fam.name, ckpt_dir)


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


# torch.compile(dynamic=True), torch.export with dynamic H/W and ONNX: three sizes each (a row's compile_static:
# dynamic=False, one graph per size; its compile_sizes: those sizes in one graph).


@pytest.mark.parametrize("fam", cells(FAMS, lambda f: f.tiny.compile_skip))
def test_compile_dynamic_equals_eager(fam, ckpt_dir):
    assert_compiled_equals_eager(fam.name, ckpt_dir)


@pytest.mark.parametrize("fam", cells(FAMS, lambda f: f.export_note))
def test_torch_export_and_onnx_dynamic_height_width(fam, ckpt_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    assert_exports_equal_eager(fam.name, ckpt_dir, None if fam.onnx_note else tmp_path / "m.onnx")


def test_a_family_that_cannot_export_says_why(ckpt_dir):
    """Each family left out above has its reason in docs/families.md."""
    assert_notes_are_documented_and_errors_raised(FAMS, ckpt_dir)
