"""EfficientFormerV2, EfficientFormer and NesT at any size: each equals the timm model built for the size (with its
geometry-bound tensors resampled as a load at that size resamples them), also under TorchScript, FX and torch.export
(dynamic H x W); TinyViT is
right on the generic path (no row)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from script_fx import fx_model
from test_families import SETUP

import timm_anysize
from conftest import tiny_arch, unique_name
from timm_anysize.core.resample import resize_bias_grid
from timm_anysize.families import FAMILIES


def _perturbed(arch, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(arch, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialized tables: resampling must show
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _biases_resized_for(base, built):
    """The base's state dict with each attention's bias table resized to the built model's resolution."""
    sd, old, new = dict(base.state_dict()), dict(base.named_modules()), dict(built.named_modules())
    for key in sd:
        if key.endswith("attention_biases"):
            owner = key.rsplit(".", 1)[0]
            sd[key] = resize_bias_grid(sd[key], tuple(old[owner].resolution), tuple(new[owner].resolution), "bicubic")
    return sd


def _compiled(model, how, size):
    """TorchScript, timm's FX harness, or torch.export with dynamic H and W (traced at ``size``)."""
    if how == "script":
        return torch.jit.script(model)
    if how == "fx":
        return fx_model(model)
    from torch.export import Dim, export

    x = torch.randn(2, 3, *size)
    return export(model, (x,), dynamic_shapes={"x": {2: Dim.DYNAMIC, 3: Dim.DYNAMIC}}).module()


V2 = "efficientformerv2_s0"
V2_ARGS = SETUP["efficientformer_v2"].model_args


@pytest.mark.parametrize("other", [(96, 128), (128, 64)])
def test_efficientformer_v2_at_any_size_equals_the_model_built_for_it(other):
    """Every attention at its input's resolution: strided (stage 2), subsampling and plain (stage 3)."""
    base = _perturbed(V2, img_size=64, **V2_ARGS)
    model = timm_anysize.enable_dynamic(copy.deepcopy(base))
    built = timm.create_model(V2, img_size=other, **V2_ARGS).eval()
    assert any(tuple(m.resolution) != (2, 2) for m in built.modules() if hasattr(m, "attention_biases"))
    built.load_state_dict(_biases_resized_for(base, built))
    with torch.no_grad():
        for reference, hw in ((base, (64, 64)), (built, other)):
            x = torch.randn(2, 3, *hw)
            assert torch.equal(model(x), reference(x)), hw
        x = torch.randn(1, 3, *other)
        ours = model.forward_intermediates(x, intermediates_only=True)
        theirs = built.forward_intermediates(x, intermediates_only=True)
        assert len(ours) == 4 and all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_efficientformer_v2_runs_where_timm_cannot_upsample_by_two():
    """An odd stage-2 map (80 px: 5x5) fails in timm's own forward; the dynamic path upsamples to its input's size,
    and a variant at such a size is rejected at validation with the nearest sizes that work."""
    base = _perturbed(V2, img_size=64, **V2_ARGS)
    with pytest.raises(RuntimeError):
        timm.create_model(V2, img_size=80, **V2_ARGS).eval()(torch.randn(1, 3, 80, 80))
    model = timm_anysize.enable_dynamic(copy.deepcopy(base))
    with torch.no_grad():
        for hw in ((80, 80), (81, 47)):
            assert torch.isfinite(model(torch.randn(1, 3, *hw))).all(), hw
    with pytest.raises(
        timm_anysize.SpecError,
        match=r"stage 2's strided attention.*gets \[5, 5\].*nearest heights "
        r"that work: 64 or 81",
    ):
        timm_anysize.register_variant("efficientformer_v2_bad_size", base=V2, model_args=V2_ARGS, img_size=80)


def test_efficientformer_v2_gradients_reach_the_biases_at_another_size():
    model = timm_anysize.enable_dynamic(timm.create_model(V2, img_size=64, **V2_ARGS))
    model(torch.randn(2, 3, 96, 128)).sum().backward()
    for name, p in model.named_parameters():
        if name.endswith("attention_biases"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("how", ["script", "fx", "export"])
def test_efficientformer_v2_script_fx_and_export_equal_eager(how):
    model = timm_anysize.enable_dynamic(_perturbed(V2, img_size=64, **V2_ARGS))
    compiled = _compiled(model, how, (96, 128))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for hw in ((64, 64), (96, 128), (81, 47)):
            x = torch.randn(2, 3, *hw, generator=gen)
            out = compiled(x)
            out = next(iter(out.values())) if how == "fx" else out
            assert torch.equal(out, model(x)), hw


def test_nest_load_at_another_size_equals_timm_resize_pos_embed(make_checkpoint):
    """With ``antialias: false`` (timm's ``nest.resize_pos_embed`` has none), each level's blocked embedding is
    resampled as timm resamples it, up and down; the default (antialias, as for every family) differs from it."""
    from timm.models.nest import resize_pos_embed

    path, base = make_checkpoint("nest_tiny", img_size=64)
    src = base.state_dict()
    no_aa = {"pos_embed": {"antialias": False}}
    for size, adapt, same in ((128, no_aa, True), (32, no_aa, True), (128, {}, False)):
        name = timm_anysize.register_variant(
            unique_name(), base="nest_tiny", img_size=size, adapt=adapt, pretrained={"file": str(path), "img_size": 64}
        )
        model = timm.create_model(name, pretrained=True)
        report = timm_anysize.adaptation_report(model)
        for i in range(3):
            key = f"levels.{i}.pos_embed"
            theirs = resize_pos_embed(src[key], model.state_dict()[key])
            assert model.state_dict()[key].shape == theirs.shape != src[key].shape
            assert torch.equal(model.state_dict()[key], theirs) is same, (size, key)
            assert report.entries[key].action == "resampled"


@pytest.mark.parametrize("other", [96, 128])
def test_nest_at_any_size_equals_the_model_built_for_it(other):
    """Each level at its input's grid, its embedding resampled (as timm's resize_pos_embed: no antialias) and cut
    into as many blocks as timm cuts."""
    from timm.models.nest import resize_pos_embed

    base = _perturbed("nest_tiny", img_size=64)
    model = timm_anysize.enable_dynamic(copy.deepcopy(base), antialias=False)
    built = timm.create_model("nest_tiny", img_size=other).eval()
    target = built.state_dict()
    built.load_state_dict(
        {k: resize_pos_embed(v, target[k]) if k.endswith("pos_embed") else v for k, v in base.state_dict().items()}
    )
    with torch.no_grad():
        for reference, hw in ((base, (64, 64)), (built, (other, other))):
            x = torch.randn(2, 3, *hw)
            assert torch.equal(model(x), reference(x)), hw
        x = torch.randn(1, 3, other, other)
        ours = model.forward_intermediates(x, intermediates_only=True)
        theirs = built.forward_intermediates(x, intermediates_only=True)
        assert len(ours) == 3 and all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_nest_non_square_input_gets_non_square_blocks_and_pads_to_whole_blocks():
    """96 x 64 px: level 0 is 24 x 16 patches in 4 x 4 blocks of 6 x 4; 70 x 50 px is padded to 80 x 64 (whole
    blocks at every level), or refused with the multiple where padding is off."""
    model = timm_anysize.enable_dynamic(_perturbed("nest_tiny", img_size=64))
    with torch.no_grad():
        for hw in ((96, 64), (70, 50)):
            assert torch.isfinite(model(torch.randn(1, 3, *hw))).all(), hw
    strict = timm_anysize.enable_dynamic(_perturbed("nest_tiny", img_size=64), pad=False)
    with pytest.raises(
        timm_anysize.InputNotDivisibleError,
        match=r"input 70x50 is not a multiple of NesT's whole blocks .*16x16 .*64x48 or 80x64",
    ) as err:
        strict(torch.randn(1, 3, 70, 50))
    assert (err.value.size, err.value.multiple) == ((70, 50), (16, 16))


def test_nest_non_square_variant_is_declared():
    with pytest.raises(
        timm_anysize.SpecError,
        match=r"nest family cannot take img_non_square: timm builds NesT "
        r"for square sizes only",
    ):
        timm_anysize.register_variant(unique_name(), base="nest_tiny", img_size=[96, 64])


@pytest.mark.parametrize("how", ["script", "fx", "export"])
def test_nest_script_fx_and_export_equal_eager(how):
    model = timm_anysize.enable_dynamic(_perturbed("nest_tiny", img_size=64))
    compiled = _compiled(model, how, (96, 64))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for hw in ((64, 64), (96, 64), (70, 50)):
            x = torch.randn(2, 3, *hw, generator=gen)
            out = compiled(x)
            out = next(iter(out.values())) if how == "fx" else out
            assert torch.equal(out, model(x)), hw


EF_ARGS = SETUP["efficientformer"].model_args


def _efficientformer_built_for(base, grid):
    """timm's EfficientFormer with each attention rebuilt by timm for ``grid`` (timm's ``Attention`` takes a
    resolution; its model always passes 7) holding the base's table resized to it."""
    from timm.models.efficientformer import Attention

    built = copy.deepcopy(base)
    for block in built.modules():
        if isinstance(getattr(block, "token_mixer", None), Attention):
            old = block.token_mixer
            new = Attention(
                old.qkv.in_features,
                key_dim=old.key_dim,
                num_heads=old.num_heads,
                attn_ratio=old.attn_ratio,
                resolution=grid,
            )
            sd = dict(
                old.state_dict(),
                attention_bias_idxs=new.attention_bias_idxs,
                attention_biases=resize_bias_grid(old.attention_biases.detach(), (7, 7), grid, "bicubic"),
            )
            new.load_state_dict(sd)
            block.token_mixer = new
    return built.eval()


@pytest.mark.parametrize("other, grid", [((256, 224), (8, 7)), ((96, 160), (3, 5))])
def test_efficientformer_at_any_size_equals_timm_attentions_built_for_the_grid(other, grid):
    """Why timm fixes the size: 7x7 tables at every img_size (the forward fails elsewhere). The dynamic model equals
    timm's own at 224 px, and elsewhere timm's model whose attentions timm built for the last stage's grid."""
    base = _perturbed("efficientformer_l1", img_size=224, **EF_ARGS)
    assert (
        timm.create_model("efficientformer_l1", img_size=96, **EF_ARGS).state_dict().keys() == base.state_dict().keys()
    )
    with pytest.raises(RuntimeError), torch.no_grad():
        base(torch.randn(1, 3, *other))
    model = timm_anysize.enable_dynamic(copy.deepcopy(base))
    built = _efficientformer_built_for(base, grid)
    with torch.no_grad():
        for reference, hw in ((base, (224, 224)), (built, other)):
            x = torch.randn(2, 3, *hw)
            assert torch.equal(model(x), reference(x)), hw
        x = torch.randn(1, 3, 99, 131)  # odd grids: 4 x 5 (timm's own intermediates would lay it out as 3 x 4)
        (*_, last) = model.forward_intermediates(x, intermediates_only=True)
        assert last.shape[-2:] == (4, 5)


@pytest.mark.parametrize("how", ["script", "fx", "export"])
def test_efficientformer_script_fx_and_export_equal_eager(how):
    model = timm_anysize.enable_dynamic(_perturbed("efficientformer_l1", img_size=224, **EF_ARGS))
    compiled = _compiled(model, how, (256, 160))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for hw in ((224, 224), (256, 160), (99, 131)):
            x = torch.randn(2, 3, *hw, generator=gen)
            out = compiled(x)
            out = next(iter(out.values())) if how == "fx" else out
            assert torch.equal(out, model(x)), hw


TINY_VIT_ARGS = dict(
    embed_dims=[16, 32, 32, 64], depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 2], window_sizes=[4, 4, 4, 4]
)


@pytest.mark.parametrize(
    "change",
    [dict(img_size=96), dict(img_size=[96, 64]), dict(in_chans=1)],
    ids=["img_larger", "img_non_square", "in_chans_1"],
)
def test_tiny_vit_is_right_on_the_generic_path(change, make_checkpoint):
    """TinyViT needs no row: its attention biases are sized by its windows (fixed by window_sizes, not by img_size)
    and it pads to whole windows, so the generic path copies every tensor but the channel-adapted first conv, and
    the variant is timm's own model built at that geometry, at its size and at any other."""
    from safetensors.torch import load_file

    path, base = make_checkpoint("tiny_vit_5m_224", **TINY_VIT_ARGS)
    name = timm_anysize.register_variant(
        unique_name(),
        base="tiny_vit_5m_224",
        model_args=TINY_VIT_ARGS,
        pretrained={"file": str(path), "img_size": 64},
        **change,
    )
    model = timm.create_model(name, pretrained=True).eval()
    assert model._anysize_plan.family.generic and timm_anysize.is_dynamic(model)
    loaded, report, checkpoint = model.state_dict(), timm_anysize.adaptation_report(model), load_file(path)
    assert set(report.entries) == set(loaded)
    non_copied = {e.key for e in report.non_copied()}
    assert non_copied == ({"patch_embed.conv1.conv.weight"} if "in_chans" in change else set())
    assert all(torch.equal(loaded[k], checkpoint[k]) for k in loaded if k not in non_copied)
    # (TinyViT takes no img_size: timm's model is the same at every size)
    timm_own = timm.create_model("tiny_vit_5m_224", **TINY_VIT_ARGS, in_chans=change.get("in_chans", 3)).eval()
    timm_own.load_state_dict(loaded)
    c, h, w = model.pretrained_cfg["input_size"]
    with torch.no_grad():
        for hw in ((h, w), (h + 32, w), (h, w + 45)):
            x = torch.randn(2, c, *hw)
            assert torch.equal(model(x), timm_own(x)), hw


def test_tiny_vit_window_change_is_refused_by_name(make_checkpoint):
    """Another window (timm's 384/512 px TinyViTs) resizes the biases in timm's checkpoint_filter_fn; the generic
    path refuses it by name, when the variant is registered (no row resamples a TinyViT window yet)."""
    path, _ = make_checkpoint("tiny_vit_5m_224", **TINY_VIT_ARGS)
    with pytest.raises(
        timm_anysize.AdaptationError,
        match=r"TinyVit, no family row.*stages\.\{1\.\.3\}\.blocks\.0\.attn\.attention_biases",
    ):
        timm_anysize.register_variant(
            unique_name(),
            base="tiny_vit_5m_224",
            model_args=dict(TINY_VIT_ARGS, window_sizes=[8, 8, 8, 8]),
            pretrained={"file": str(path), "model_args": {"window_sizes": [4, 4, 4, 4]}},
        )


@pytest.mark.parametrize(
    "family, size, other",
    [("nest", 64, (96, 64)), ("efficientformer_v2", 64, (96, 128)), ("efficientformer", 224, (160, 96))],
)
def test_features_only_at_another_size_equal_the_full_models_intermediates(family, size, other, make_checkpoint):
    """timm's feature wrappers (NesT, EfficientFormerV2: their modules flattened into a FeatureListNet;
    EfficientFormer: forward_intermediates) run every level at another size as the full model does."""
    fam = next(f for f in FAMILIES if f.name == family)
    args = SETUP[family].model_args
    path, _ = make_checkpoint(fam.example, img_size=size, **args)
    name = timm_anysize.register_variant(
        unique_name(),
        base=fam.example,
        model_args=args,
        img_size=size,
        pretrained={"file": str(path), "img_size": size},
    )
    feats = timm.create_model(name, pretrained=True, features_only=True).eval()
    model = timm.create_model(name, pretrained=True).eval()
    assert feats.pretrained_cfg["fixed_input_size"] is False
    x = torch.randn(1, 3, *other)
    with torch.no_grad():
        got, expected = feats(x), model.forward_intermediates(x, intermediates_only=True)
    assert len(got) == len(expected) >= 3
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize(
    "arch, args, sizes",
    [
        (V2, dict(V2_ARGS, img_size=64), [(96, 128), (64, 64), (81, 47)]),
        ("efficientformer_l1", EF_ARGS, [(256, 160), (224, 224), (99, 131)]),
    ],
    ids=["efficientformer_v2", "efficientformer"],
)
def test_onnx_with_dynamic_height_width_runs_in_onnxruntime(arch, args, sizes, tmp_path):
    """The families' ``export`` cell (docs/families.md): ONNX through torch.export, dynamic batch, H and W."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(
        _onnx(model := timm_anysize.enable_dynamic(_perturbed(arch, **args)), sizes[0], tmp_path),
        providers=["CPUExecutionProvider"],
    )
    with torch.no_grad():
        for hw in sizes:
            x = torch.randn(1, 3, *hw)
            out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
            torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)


def _onnx(model, size, tmp_path, dims=(0, 2, 3)) -> str:
    from torch.export import Dim

    onnx = torch.onnx.export(
        model,
        (torch.randn(2, 3, *size),),
        dynamo=True,
        verbose=False,
        dynamic_shapes={"x": {d: Dim.DYNAMIC for d in dims}},
    )
    onnx.save(str(tmp_path / "m.onnx"))
    return str(tmp_path / "m.onnx")


def test_nest_onnx_stops_on_timms_own_attention_as_its_export_note_says(tmp_path):
    """torch.export takes the dynamic NesT (test above); ONNX does not, for plain timm's NesT either: its attention
    is a 5-D scaled_dot_product_attention (blocks x tokens), which onnxscript converts in 4-D only."""
    fam = next(f for f in FAMILIES if f.name == "nest")
    assert "5-D scaled_dot_product_attention" in fam.onnx_note
    pytest.importorskip("onnxscript")
    arch = tiny_arch(fam)  # NesT-T's layout, one block a level (tests/anysize_tiny_models.py)
    for model, dims in (
        (timm_anysize.enable_dynamic(_perturbed(arch, img_size=64)), (0, 2, 3)),
        (timm.create_model(arch, img_size=64).eval(), (0,)),
    ):  # plain timm: its own size
        with pytest.raises(Exception, match="only 4D query, key, and value are supported"):
            _onnx(model, (64, 64), tmp_path, dims)
