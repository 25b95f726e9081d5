"""The family coverage matrix: one small model per family x every geometry change, each cell passing exact checks
or declared unsupported (and then rejected at validation); docs/families.md is kept in sync with the table.

Every family is checked at the tiny model its row declares (``Family.tiny``): a new family module is a new row of
every test here, with nothing to add to this file. ``pytest tests/test_families.py -k swin`` runs one family's cells.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Optional

import pytest
import timm
import torch
from safetensors.torch import load_file

import timm_anysize
from conftest import unique_name
from timm_anysize.apps.docs import families_markdown
from timm_anysize.core.family import GEOMETRY_CHANGES, Family, TinyModel
from timm_anysize.families import FAMILIES, FAMILY_MODULES, UNSUPPORTED

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(embed_dim=64, depth=2, num_heads=2)
# Each family's tiny model (model args, the size its checkpoint is built at, the step by which test sizes grow),
# declared in its row.
SETUP = {f.name: f.tiny for f in FAMILIES}
# The groups of TinyModel.script_fx: one tests/test_script_fx_<group>.py module each.
SCRIPT_FX_GROUPS = tuple(sorted(p.stem.removeprefix("test_script_fx_") for p in ROOT.glob("tests/test_script_fx_*.py")))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_declares_its_tiny_model(family):
    """The row is the family's test row: a tiny model to check it at, the conformance variants timm's own tests run
    on, and, if any, the script/FX module that checks it (see CONTRIBUTING.md)."""
    tiny = family.tiny
    assert tiny is not None, f"the {family.name} row declares no tiny=TinyModel(...) to test it at"
    assert tiny.conformance, f"the {family.name} row declares no conformance variants (tiny.conformance)"
    assert tiny.script_fx in ("", *SCRIPT_FX_GROUPS), tiny.script_fx
    # out of a group, or out of one of its checks, only with the reason
    assert bool(tiny.script_fx) is not bool(tiny.script_fx_note), (tiny.script_fx, tiny.script_fx_note)
    assert not tiny.export_error or family.export_note, "export_error names how the export_note's failure shows"
    assert not tiny.timm_runs_off_multiple or family.size_multiples
    assert all(len(sizes) == n for sizes, n in ((tiny.other_sizes, 2), (tiny.compile_sizes, 3)) if sizes)
    with torch.device("meta"):  # the tiny model builds (shapes only)
        timm.create_model(
            family.example, **({"img_size": tiny.img_size} if tiny.img_size_arg else {}), **tiny.model_args
        )


def test_rows_have_one_name_each_and_a_shared_class_lives_in_one_module():
    """family_of tries rows in module-name order; only rows of one class depend on it, so they live in one module
    (in the order to try) and are told apart by ``matches`` (a ViT hybrid from a ViT)."""
    names = [f.name for f in FAMILIES]
    assert len(names) == len(set(names)), names
    homes, rows = defaultdict(set), defaultdict(list)  # class -> the modules / the rows that claim it
    for module in FAMILY_MODULES:
        for fam in module.FAMILIES:
            for cls in fam.classes:
                homes[cls].add(module.__name__)
                rows[cls].append(fam)
    assert all(len(m) == 1 for m in homes.values()), {c.__name__: sorted(m) for c, m in homes.items() if len(m) > 1}
    assert all(f.matches is not None for fams in rows.values() if len(fams) > 1 for f in fams)


def test_every_public_module_of_the_families_package_is_a_family_module():
    """A module of timm_anysize/families/ without ``FAMILIES`` would be skipped silently: shared code goes in a
    module named ``_*`` (as ``_generic.py``, which makes the generic row per model)."""
    package = ROOT / "timm_anysize" / "families"
    public = {p.stem for p in package.glob("*.py") if not p.stem.startswith("_")}
    assert public == {m.__name__.rsplit(".", 1)[-1] for m in FAMILY_MODULES}


def test_docs_families_is_in_sync():
    assert (ROOT / "docs" / "families.md").read_text() == families_markdown()


def change_spec(change: str, size: int, step: int, patch: Optional[int]) -> dict:
    if change.startswith("patch") and patch is None:
        return dict(patch_size=8)  # a family without a patch kernel: any patch_size is the unsupported change
    return {
        "img_larger": lambda: dict(img_size=size + step),
        "img_non_square": lambda: dict(img_size=[size + step, size]),
        "patch_smaller": lambda: dict(img_size=size, patch_size=patch // 2),
        "patch_larger": lambda: dict(img_size=size if size % (2 * step) == 0 else 2 * size, patch_size=2 * patch),
        "in_chans_1": lambda: dict(in_chans=1),
        "in_chans_4": lambda: dict(in_chans=4),
    }[change]()


@pytest.fixture
def family_checkpoint(make_checkpoint):
    def make(family):
        setup = SETUP[family.name]
        size = {"img_size": setup.img_size} if setup.img_size_arg else {}
        path, base = make_checkpoint(family.example, **size, **setup.model_args)
        return path, base, setup

    return make


def _num_outputs(model) -> int:
    return model.num_classes or model.num_features


@pytest.mark.parametrize("change", list(GEOMETRY_CHANGES))
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_matrix_cell(family, change, family_checkpoint):
    path, base, setup = family_checkpoint(family)
    size = setup.img_size
    patch = family.patch_size(base)
    spec = dict(
        base=family.example,
        model_args=setup.model_args,
        pretrained={"file": str(path), "img_size": size},
        **change_spec(change, size, setup.step, patch and patch[0]),
    )
    if (family.name, change) in UNSUPPORTED:
        # a family without a patch kernel: any patch_size is refused (as patch_larger when there is no size to compare)
        expected = "patch_(smaller|larger)" if change.startswith("patch") else change
        with pytest.raises(timm_anysize.SpecError, match=rf"the {family.name} family cannot take {expected}"):
            timm_anysize.register_variant(unique_name(), **spec)
        return
    name = timm_anysize.register_variant(unique_name(), **spec)
    torch.manual_seed(0)
    fresh = timm.create_model(name).state_dict()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=True).eval()
    loaded, report = model.state_dict(), timm_anysize.adaptation_report(model)
    checkpoint = load_file(path)
    assert set(report.entries) == set(loaded)  # every tensor accounted for
    for key, entry in report.entries.items():
        if entry.action == "copied":  # copied exactly
            assert torch.equal(loaded[key], checkpoint[key]), key
        elif entry.action != "initialized":  # resampled / adapted: nothing silently left at its fresh init
            assert not torch.equal(loaded[key], fresh[key]), key
    plan = model._anysize_plan
    touches_weights = change.startswith(("patch", "in_chans")) or any(r.changes for r in plan.resamples.values())
    assert bool(report.non_copied()) == touches_weights
    c, h, w = model.pretrained_cfg["input_size"]
    sizes = [(h, w)]
    if timm_anysize.is_dynamic(model):
        step = max(setup.step, (plan.target.patch_size or (0,))[0])
        if family.whole_patches:  # whole patches only: a multiple of the setup's step and of the patch
            step = math.lcm(setup.step, (plan.target.patch_size or (1,))[0])
        sizes += [(h + step, w), (h, w + 2 * step + (0 if family.whole_patches else 1))]  # the last one padded
    with torch.no_grad():
        for hw in sizes:
            out = model(torch.randn(2, c, *hw))
            assert out.shape == (2, _num_outputs(model)) and torch.isfinite(out).all(), hw


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_same_geometry_is_bit_identical(family, family_checkpoint):
    path, base, setup = family_checkpoint(family)
    size = setup.img_size
    name = timm_anysize.register_variant(
        unique_name(),
        base=family.example,
        model_args=setup.model_args,
        img_size=size,
        pretrained={"file": str(path), "img_size": size},
    )
    model = timm.create_model(name, pretrained=True).eval()
    assert timm_anysize.adaptation_report(model).non_copied() == []
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_runs_at_any_size_by_default(family):
    """``dynamic`` defaults to what the family supports (every family but the token-count-bound MLP-Mixers);
    asking a family that cannot is rejected at validation (plan.py) with the family's reason."""
    setup = SETUP[family.name]
    spec = dict(
        base=family.example,
        model_args=setup.model_args,
        img_size=setup.img_size,
        pretrained={"img_size": setup.img_size},
    )
    if not family.supports_dynamic:
        with pytest.raises(
            timm_anysize.SpecError,
            match=rf"the {family.name} family cannot run at any input size: " + re.escape(family.dynamic_reason),
        ):
            timm_anysize.register_variant(unique_name(), **spec, dynamic=True)
    model = timm.create_model(timm_anysize.register_variant(unique_name(), **spec))
    assert timm_anysize.is_dynamic(model) is family.supports_dynamic
    assert model.pretrained_cfg["fixed_input_size"] is not family.supports_dynamic


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_one_channel_variant_on_gray_equals_base_on_gray_rgb(family, family_checkpoint):
    """adapt_input_conv sums the RGB kernel: a gray image gives the tokens the base gives that image as RGB, through
    whatever first layer the family has (patch conv, conv stem, NaFlexViT's linear projection)."""
    path, base, setup = family_checkpoint(family)
    name = timm_anysize.register_variant(
        unique_name(),
        base=family.example,
        model_args=setup.model_args,
        img_size=setup.img_size,
        in_chans=1,
        pretrained={"file": str(path), "img_size": setup.img_size},
    )
    model = timm.create_model(name, pretrained=True).eval()
    gray = torch.rand(2, 1, setup.img_size, setup.img_size)
    with torch.no_grad():
        torch.testing.assert_close(model(gray), base.eval()(gray.expand(-1, 3, -1, -1)), atol=2e-5, rtol=1e-4)


def test_swin_window_change_resizes_every_bias_table_between_the_windows_of_its_block(make_checkpoint):
    """The weights' window is declared under pretrained.model_args; each block's table is resized between the
    windows its block has in the two models (a late stage's window is clamped to its smaller feature map)."""
    args = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    path, base = make_checkpoint("swin_tiny_patch4_window7_224", img_size=64, window_size=4, **args)
    name = timm_anysize.register_variant(
        unique_name(),
        base="swin_tiny_patch4_window7_224",
        img_size=128,
        model_args=dict(args, window_size=8),
        pretrained={"file": str(path), "img_size": 64, "model_args": {"window_size": 4}},
    )
    model = timm.create_model(name, pretrained=True).eval()
    details = {k: e.detail for k, e in timm_anysize.adaptation_report(model).entries.items() if e.action == "resampled"}
    # source windows 4, 4, 4, 2 (grid 16: the last stage is 2x2); target 8, 8, 8, 4 (grid 32)
    assert details == {
        f"layers.{i}.blocks.0.attn.relative_position_bias_table": f"relative-position window {a}x{a} -> {b}x{b}"
        for i, (a, b) in enumerate([(4, 8), (4, 8), (4, 8), (2, 4)])
    }
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 128, 128))).all()


def test_naflexvit_linear_projection_keeps_patch_tokens_under_pi_resize(make_checkpoint):
    """NaFlexViT's nn.Linear over (ph, pw, C) patches is PI-resized as the conv kernel it is: a patch upsampled
    16 -> 32 px gives the base's token."""
    import torch.nn.functional as F

    path, base = make_checkpoint("naflexvit_base_patch16_gap", img_size=64, **SMALL)
    name = timm_anysize.register_variant(
        unique_name(),
        base="naflexvit_base_patch16_gap",
        model_args=SMALL,
        img_size=128,
        patch_size=32,
        pretrained={"file": str(path), "img_size": 64},
    )
    model = timm.create_model(name, pretrained=True)
    patches = torch.randn(6, 3, 16, 16)
    up = F.interpolate(patches, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)

    def tokens(m, p):
        return m.embeds.proj(p.permute(0, 2, 3, 1).reshape(p.shape[0], -1))  # NaFlex's (ph, pw, C) order

    with torch.no_grad():
        base_tok, new_tok = tokens(base, patches), tokens(model, up)
    assert (new_tok - base_tok).norm() / base_tok.norm() < 1e-4


def test_vit_with_use_naflex_adapts_its_channels_instead_of_leaving_them_at_init(make_checkpoint):
    """timm leaves embeds.proj.weight at random init (with a warning) when in_chans changes on use_naflex=True."""
    args = dict(SMALL, use_naflex=True)
    path, base = make_checkpoint("vit_tiny_patch16_224", img_size=64, **args)
    name = timm_anysize.register_variant(
        unique_name(),
        base="vit_tiny_patch16_224",
        model_args=args,
        img_size=64,
        in_chans=1,
        pretrained={"file": str(path), "img_size": 64},
    )
    model = timm.create_model(name, pretrained=True).eval()
    assert timm_anysize.adaptation_report(model).entries["embeds.proj.weight"].action == "adapted"
    gray = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(gray), base.eval()(gray.expand(-1, 3, -1, -1)), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_export_loads_in_plain_timm_with_the_same_outputs(family, family_checkpoint, tmp_path):
    """The exported folder names the base architecture and the variant's model_args: timm's own loader builds it
    and gives the same outputs at the variant's size (twice the checkpoint's: every Swin stage a whole number of
    windows, where timm's masks are right)."""
    path, _, setup = family_checkpoint(family)
    size = setup.export_scale * setup.img_size if family.supports_dynamic else setup.img_size  # (MLP-Mixers: one size)
    name = timm_anysize.register_variant(
        unique_name(),
        base=family.example,
        model_args=setup.model_args,
        img_size=size,
        pretrained={"file": str(path), "img_size": setup.img_size},
    )
    model = timm.create_model(name, pretrained=True).eval()
    out = timm_anysize.export(model, tmp_path / "export")
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert type(plain).__module__.startswith("timm.")
    # any size in plain timm only where timm has the dynamic path itself (timm writes fixed_input_size from the
    # model it builds); the card says which
    if not family.timm_dynamic:  # fixed, unless timm builds the patch embedding non-strict (SAM: whole patches)
        assert plain.pretrained_cfg["fixed_input_size"] is getattr(
            getattr(plain, "patch_embed", None), "strict_img_size", True
        )
    elif "dynamic_img_size" in family.dynamic_args:
        assert plain.pretrained_cfg["fixed_input_size"] is False
    card = (out / "README.md").read_text()
    assert ("enable_dynamic(model)` runs it at any size" in card) is (
        family.supports_dynamic and not family.timm_dynamic
    )
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))


def test_a_window_the_weights_were_not_built_with_is_named_with_the_fix(make_checkpoint):
    args = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    path, _ = make_checkpoint("swin_tiny_patch4_window7_224", img_size=64, window_size=4, **args)
    name = timm_anysize.register_variant(
        unique_name(),
        base="swin_tiny_patch4_window7_224",
        img_size=128,
        model_args=dict(args, window_size=8),
        pretrained={"file": str(path), "img_size": 64},
    )
    with pytest.raises(
        timm_anysize.AdaptationError,
        match=r"layers\.0\.blocks\.0\.attn\.relative_position_bias_table: checkpoint \(49, 1\), the "
        r"source geometry .* implies \(225, 1\); .*model_args such as a Swin window_size",
    ):
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_features_only_carries_the_adapted_weights(family, family_checkpoint):
    """timm's feature wrapper (whatever its kind and naming) gets every adapted tensor; feature models of families
    whose feature path is dynamic run at another size, the others are marked fixed-size."""
    path, base, setup = family_checkpoint(family)
    size = setup.img_size + setup.step if family.supports_dynamic else setup.img_size  # (MLP-Mixers: one size)
    spec = dict(
        base=family.example,
        model_args=setup.model_args,
        img_size=size,
        in_chans=1,
        pretrained={"file": str(path), "img_size": setup.img_size},
    )
    name = timm_anysize.register_variant(unique_name(), **spec)
    full = timm.create_model(name, pretrained=True).state_dict()
    # the first feature with a module to hook (timm's TResNet lists its stem as module '', which timm cannot hook)
    first = (
        next(i for i, info in enumerate(base.feature_info) if info["module"]) if hasattr(base, "feature_info") else 0
    )
    feats = timm.create_model(name, pretrained=True, features_only=True, out_indices=(first,)).eval()
    wrapper_sd = feats.state_dict()
    matched = [
        k for k, v in wrapper_sd.items() if any(torch.equal(v, full[f]) for f in full if full[f].shape == v.shape)
    ]
    assert matched == list(wrapper_sd)
    sizes = [(size, size)] + ([] if feats.pretrained_cfg["fixed_input_size"] else [(size + setup.step, size)])
    assert feats.pretrained_cfg["fixed_input_size"] is not family.dynamic_features
    with torch.no_grad():
        for hw in sizes:
            assert all(torch.isfinite(f).all() for f in feats(torch.randn(1, 1, *hw))), hw


def test_mvitv2_non_square_variant_gets_per_axis_tables(make_checkpoint, tmp_path):
    """timm builds MViTv2 square only; a non-square variant is built square with each width table refitted, loads
    every table resized to its own axis, runs at its size through timm's own forward, and refuses a plain export."""
    path, _ = make_checkpoint("mvitv2_tiny", img_size=64)
    name = timm_anysize.register_variant(
        unique_name(),
        base="mvitv2_tiny",
        img_size=[128, 64],
        dynamic=False,
        pretrained={"file": str(path), "img_size": 64},
    )
    model = timm.create_model(name, pretrained=True).eval()
    sd, report = model.state_dict(), timm_anysize.adaptation_report(model)
    # stage 0: the 32 x 16 feature map with keys pooled by 4 -> 2 * 32 - 1 rows, 2 * 16 - 1 columns
    assert (
        sd["stages.0.blocks.0.attn.rel_pos_h"].shape[0] == 63 and sd["stages.0.blocks.0.attn.rel_pos_w"].shape[0] == 31
    )
    assert (
        report.entries["stages.0.blocks.0.attn.rel_pos_h"].detail == "relative-position axis 31 -> 63 entries (linear)"
    )
    assert report.entries["stages.0.blocks.0.attn.rel_pos_w"].action == "copied"
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 128, 64))).all()
    with pytest.raises(timm_anysize.ExportError, match="square sizes only"):
        timm_anysize.export(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_swin_export_whose_own_size_pads_says_plain_timm_differs(make_checkpoint, tmp_path):
    args = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4)
    path, _ = make_checkpoint("swin_tiny_patch4_window7_224", img_size=64, **args)
    for size, pads in ((72, True), (128, False)):  # 72: an 18x18 first stage in 4x4 windows
        name = timm_anysize.register_variant(
            unique_name(),
            base="swin_tiny_patch4_window7_224",
            model_args=args,
            img_size=size,
            pretrained={"file": str(path), "img_size": 64},
        )
        out = timm_anysize.export(name, tmp_path / f"export{size}")
        assert ("padded to whole windows" in (out / "README.md").read_text()) is pads


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.size_multiples], ids=lambda f: f.name)
def test_a_size_the_branches_cannot_take_is_rejected_with_the_nearest_that_work(family):
    """CrossViT embeds the input once per branch (resized by the branch's scale) in whole patches: 160 px is
    13.3 patches of 12 for branch 0 and fails in timm's own forward; validation names the constraint and the
    nearest sizes, each of which builds and runs at its own size. (Where the row's ``timm_runs_off_multiple`` says
    timm's own forward runs such a size, dropping pixels, it runs: the family's own module checks what it drops.)"""
    setup = SETUP[family.name]
    with torch.device("meta"):
        timm_model = timm.create_model(family.example, img_size=setup.img_size + setup.step // 3, **setup.model_args)
    x = torch.empty(1, 3, setup.img_size + setup.step // 3, setup.img_size + setup.step // 3, device="meta")
    if setup.timm_runs_off_multiple:
        assert timm_model(x).shape == (1, timm_model.num_classes)
    else:
        with pytest.raises(Exception):  # noqa: B017  (the geometry really cannot run in timm: any error of its own)
            timm_model(x)
    bad = setup.img_size + setup.step // 3
    with pytest.raises(
        timm_anysize.SpecError,
        match=rf"cannot run at \[{bad}, {bad}\].*not a multiple of its patch "
        rf"\d+; nearest heights that work: (\d+) or (\d+)",
    ) as info:
        timm_anysize.register_variant(unique_name(), base=family.example, model_args=setup.model_args, img_size=bad)
    import re

    for near in map(int, re.search(r"work: (\d+) or (\d+)", str(info.value)).groups()):
        name = timm_anysize.register_variant(
            unique_name(), base=family.example, model_args=setup.model_args, img_size=[near, setup.img_size]
        )
        model = timm.create_model(name).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, near, setup.img_size)).shape == (1, model.num_classes)


# The comment that marks a line whose string literals only look like family names (timm module names, another
# library's model kinds): ``# not family rows: <what they are>``.
NOT_ROWS = "# not family rows:"


def family_name_literals(path: Path, names: set[str]) -> list[str]:
    """``line: 'literal'`` for each string literal of ``path`` (docstrings aside) that is a family's name, on a line
    without the :data:`NOT_ROWS` comment."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        f"{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and node.value in names
        and id(node) not in docstrings
        and NOT_ROWS not in lines[node.lineno - 1]
    ]


def is_family_module(path: Path, names: set[str]) -> bool:
    """A test module named after a family (or its module of timm_anysize/families/): ``test_[family_]<name>[_*].py``,
    where the tests of one family's own behaviour live."""
    stem = path.stem.removeprefix("test_").removeprefix("family_")
    return any(stem == n or stem.startswith(n + "_") for n in names)


def test_a_row_with_default_fields_gets_every_check():
    """Coverage is opt-out: a new row that sets no test field is in a script/FX group and in every check of it; a
    field that leaves a check out is a reason (a string) that the skip shows."""
    tiny, row = TinyModel(), Family("new", ())
    assert tiny.script_fx in SCRIPT_FX_GROUPS
    reasons = [f.name for f in dataclasses.fields(TinyModel) if f.type == "str" and f.name != "script_fx"]
    assert len(reasons) >= 8 and all(getattr(tiny, r) == "" for r in reasons), reasons
    assert (tiny.other_sizes, tiny.compile_sizes, row.export_note, row.onnx_note) == ((), (), "", "")


def test_no_test_module_selects_families_by_name():
    """Tests pick families by the fields of their rows (``Family``, ``TinyModel``), never by name: a family added
    with default fields gets every check, and a row's opt-out carries its reason. Only the modules named after a
    family name families."""
    names = {f.name for f in FAMILIES}
    modules = {m.__name__.rsplit(".", 1)[-1] for m in FAMILY_MODULES}
    found = {
        str(path.relative_to(ROOT)): hits
        for path in sorted((ROOT / "tests").rglob("*.py"))
        if not is_family_module(path, names | modules)
        for hits in [family_name_literals(path, names)]
        if hits
    }
    assert found == {}
