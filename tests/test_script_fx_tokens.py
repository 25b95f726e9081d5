"""The position-embedding families under TorchScript, FX, forward_intermediates at any size, torch.compile,
torch.export and ONNX: each equals the eager dynamic model (a registered variant, and ``enable_dynamic`` on a timm
model) at the variant's size and at other, non-square sizes.

The rows are those whose ``TinyModel.script_fx`` is ``"tokens"`` (the default): every check runs on every row, but
where the row's field says why not (a skip with that reason)."""

from __future__ import annotations

import pytest
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
)

import timm_anysize  # noqa: F401  (registers the variants)

FAMS = group("tokens")
ids = [f.name for f in FAMS]


@pytest.mark.parametrize("fam", FAMS, ids=ids)
def test_torchscript_equals_eager(fam, ckpt_dir):
    assert_scripted_equals_eager(fam.name, ckpt_dir)


@pytest.mark.parametrize("fam", FAMS, ids=ids)
def test_fx_trace_equals_eager(fam, ckpt_dir):
    assert_fx_equals_eager(fam.name, ckpt_dir)


@pytest.mark.parametrize("fam", cells(FAMS, lambda f: f.tiny.fx_features_note))
def test_fx_feature_model_equals_eager_modules(fam, ckpt_dir):
    """``features_only=True, feature_cls='fx'``: each feature is the eager dynamic model's module output."""
    assert_fx_features_equal_module_outputs(fam.name, ckpt_dir, fam.tiny.feature_indices)


@pytest.mark.parametrize("fam", cells(FAMS, lambda f: f.tiny.built_note))
def test_forward_intermediates_at_another_size_equal_a_model_built_for_it(fam, ckpt_dir):
    """At a size other than the variant's, outputs, intermediates and features equal those of a timm model built at
    that size with the variant's weights resampled to it (a static variant of the variant's weights at that size)."""
    assert_equals_built_at_another_size(fam.name, ckpt_dir)


# torch.compile(dynamic=True), torch.export with dynamic H/W and ONNX: three sizes each. Visformer's export cell is the
# slowest of the suite after the conformance chunks (about 90 s under -n 2 on 2 cores): its stages each resample their
# own [1, C, H, W] position embedding on the symbolic size, one resample per stage where the ViT family has one in all
# (its compile cell, as long again, is skipped with the row's compile_skip).


@pytest.mark.parametrize("fam", cells(FAMS, lambda f: f.tiny.compile_skip))
def test_compile_dynamic_equals_eager(fam, ckpt_dir):
    assert_compiled_equals_eager(fam.name, ckpt_dir)


@pytest.mark.parametrize("fam", cells(FAMS, lambda f: f.export_note))
def test_torch_export_and_onnx_dynamic_height_width(fam, ckpt_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    assert_exports_equal_eager(fam.name, ckpt_dir, None if fam.onnx_note else tmp_path / "m.onnx", rtol=1e-5)


def test_a_family_that_cannot_export_says_why(ckpt_dir):
    """Each row left out above has its reason in docs/families.md, and an export that stops with an error (a
    branch-size guard) stops with the one its row names (``export_error``)."""
    assert_notes_are_documented_and_errors_raised(FAMS, ckpt_dir)
