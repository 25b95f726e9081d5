"""Exact properties of weight adaptation: copies are bit-identical, resampling equals timm's primitives, the
PI-resize and gray-channel properties hold, formats agree, and every tensor is accounted for."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resample_patch_embed

import timm_anysize
from conftest import unique_name


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def variant(base: str, ckpt, **spec) -> str:
    return timm_anysize.register_variant(
        unique_name(), base=base, pretrained={"file": str(ckpt), **spec.pop("pretrained", {})}, **spec
    )


def test_same_geometry_is_bit_identical(make_checkpoint):
    path, base = make_checkpoint("test_vit")
    m = timm.create_model(variant("test_vit", path), pretrained=True).eval()
    x = torch.randn(2, 3, 160, 160)
    assert torch.equal(m(x), base(x))
    report = timm_anysize.adaptation_report(m)
    assert report.non_copied() == [] and report.dropped == {}
    assert set(report.entries) == set(base.state_dict())


def test_resampled_tensors_equal_timm_primitives_and_the_rest_is_copied(make_checkpoint):
    path, base = make_checkpoint("test_vit")
    m = timm.create_model(variant("test_vit", path, img_size=[48, 80], patch_size=8), pretrained=True)
    src, out = base.state_dict(), m.state_dict()
    expected_pe = resample_abs_pos_embed(src["pos_embed"], new_size=[6, 10], old_size=[10, 10], num_prefix_tokens=1)
    assert torch.equal(out["pos_embed"], expected_pe)
    assert torch.equal(out["patch_embed.proj.weight"], resample_patch_embed(src["patch_embed.proj.weight"], [8, 8]))
    for k in src:
        if k not in ("pos_embed", "patch_embed.proj.weight"):
            assert torch.equal(out[k], src[k]), k
    report = timm_anysize.adaptation_report(m)
    assert report.by_action("resampled") == ["pos_embed", "patch_embed.proj.weight"]
    assert "grid 10x10 -> 6x10" in report.entries["pos_embed"].detail


def test_pos_embed_options_are_used(make_checkpoint):
    path, base = make_checkpoint("test_vit")
    name = variant(
        "test_vit", path, img_size=64, adapt={"pos_embed": {"interpolation": "bilinear", "antialias": False}}
    )
    m = timm.create_model(name, pretrained=True)
    expected = resample_abs_pos_embed(base.pos_embed, [4, 4], [10, 10], 1, interpolation="bilinear", antialias=False)
    assert torch.equal(m.pos_embed, expected)


def test_pi_resize_preserves_patch_tokens(make_checkpoint):
    """A patch upsampled 16 -> 32 px through the PI-resized kernel gives the base's token (FlexiViT's property)."""
    path, base = make_checkpoint("test_vit")
    m = timm.create_model(variant("test_vit", path, img_size=320, patch_size=32), pretrained=True)
    x = torch.randn(2, 3, 160, 160)
    x_up = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False, antialias=True)
    # Compare per-patch: upsample each 16 px patch on its own, as PI-resize assumes.
    patches = x.unfold(2, 16, 16).unfold(3, 16, 16).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 16, 16)
    up = F.interpolate(patches, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    tok_base = F.conv2d(patches, base.patch_embed.proj.weight, base.patch_embed.proj.bias).flatten()
    tok_new = F.conv2d(up, m.patch_embed.proj.weight, m.patch_embed.proj.bias).flatten()
    assert (tok_new - tok_base).norm() / tok_base.norm() < 1e-4
    # Plain kernel interpolation does not have the property (the reason PI-resize is the default).
    naive = timm.create_model(
        variant("test_vit", path, img_size=320, patch_size=32, adapt={"patch_embed": {"method": "interpolate"}}),
        pretrained=True,
    )
    tok_naive = F.conv2d(up, naive.patch_embed.proj.weight, naive.patch_embed.proj.bias).flatten()
    assert (tok_naive - tok_base).norm() / tok_base.norm() > 0.1
    assert x_up.shape[-1] == 320


def test_gray_variant_equals_base_on_repeated_gray(make_checkpoint):
    path, base = make_checkpoint("test_vit")
    m = timm.create_model(variant("test_vit", path, in_chans=1), pretrained=True).eval()
    gray = torch.randn(2, 1, 160, 160)
    torch.testing.assert_close(m(gray), base(gray.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)
    assert timm_anysize.adaptation_report(m).entries["patch_embed.proj.weight"].action == "adapted"
    assert m.pretrained_cfg["input_size"] == (1, 160, 160)
    assert len(timm.data.resolve_data_config(model=m)["mean"]) == 1


def test_channel_map(make_checkpoint):
    path, base = make_checkpoint("test_vit")
    m = timm.create_model(
        variant("test_vit", path, in_chans=4, adapt={"channels": {"method": "map", "map": [2, 1, 0, None]}}),
        pretrained=True,
    ).eval()
    w, src = m.patch_embed.proj.weight, base.patch_embed.proj.weight
    assert torch.equal(w[:, 0], src[:, 2]) and torch.equal(w[:, 2], src[:, 0]) and not w[:, 3].any()
    bgr_plus_noise = torch.randn(1, 4, 160, 160)
    torch.testing.assert_close(m(bgr_plus_noise), base(bgr_plus_noise[:, [2, 1, 0]]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("suffix", [".pth", ".npz"])
def test_formats_give_identical_variants(make_checkpoint, suffix):
    st_path, base = make_checkpoint("test_vit", ".safetensors", seed=3)
    other_path, _ = make_checkpoint("test_vit", suffix, seed=3)
    spec = dict(img_size=64, patch_size=8, in_chans=1, num_classes=10)
    torch.manual_seed(0)
    a = timm.create_model(variant("test_vit", st_path, **spec), pretrained=True).state_dict()
    torch.manual_seed(0)
    b = timm.create_model(variant("test_vit", other_path, **spec), pretrained=True).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6 if suffix == ".npz" else 0, msg=k)


def test_npz_without_head_reports_the_head_as_missing(make_checkpoint, tmp_path):
    """An npz whose head does not match the declared source is caught, not left at random init."""
    path, _ = make_checkpoint("test_vit", ".npz", num_classes=21)
    name = variant("test_vit", path)  # declares the base's 1000 classes
    with pytest.raises(timm_anysize.AdaptationError, match="head.weight"):
        timm.create_model(name, pretrained=True)
    ok = variant("test_vit", path, pretrained={"num_classes": 21}, num_classes=5)
    m = timm.create_model(ok, pretrained=True)
    assert timm_anysize.adaptation_report(m).by_action("initialized") == ["head.weight", "head.bias"]


def test_non_square_source_and_target(make_checkpoint):
    path, base = make_checkpoint("test_vit", img_size=(64, 96))  # 4x6 grid
    name = variant("test_vit", path, img_size=[96, 32], pretrained={"img_size": [64, 96]})
    m = timm.create_model(name, pretrained=True)
    expected = resample_abs_pos_embed(base.pos_embed, [6, 2], old_size=[4, 6], num_prefix_tokens=1)
    assert torch.equal(m.pos_embed, expected)
    assert m(torch.randn(1, 3, 96, 32)).shape == (1, 1000)


def test_wrong_declared_source_grid_is_an_error_not_a_guess(make_checkpoint):
    path, _ = make_checkpoint("test_vit", img_size=(64, 96))
    name = variant("test_vit", path, img_size=64)  # source geometry not declared: base cfg says 160x160
    with pytest.raises(
        timm_anysize.AdaptationError, match=r"pos_embed: checkpoint has 25 tokens.*implies 101.*pretrained"
    ):
        timm.create_model(name, pretrained=True)


SMALL = dict(embed_dim=64, depth=2, num_heads=2)


@pytest.mark.parametrize(
    "base, src_size, prefix_in_pos_embed",
    [
        ("deit_tiny_distilled_patch16_224", 64, 2),  # class + distillation tokens
        ("vit_small_patch14_reg4_dinov2", 70, 0),  # 4 registers, no_embed_class
        ("deit3_small_patch16_224", 64, 0),  # no_embed_class, layer scale
        ("eva02_tiny_patch14_224", 56, 1),  # EVA02 with RoPE (regenerated, not in the state dict)
    ],
)
def test_prefix_tokens_are_kept_aside(make_checkpoint, base, src_size, prefix_in_pos_embed):
    path, src_model = make_checkpoint(base, img_size=src_size, **SMALL)
    patch = src_model.patch_embed.patch_size[0]
    target = (src_size + 2 * patch, src_size - patch)
    name = variant(base, path, img_size=list(target), model_args=SMALL, pretrained={"img_size": src_size})
    m = timm.create_model(name, pretrained=True).eval()
    old = src_model.patch_embed.grid_size
    new = (target[0] // patch, target[1] // patch)
    expected = resample_abs_pos_embed(src_model.pos_embed, list(new), list(old), num_prefix_tokens=prefix_in_pos_embed)
    assert torch.equal(m.pos_embed, expected)
    if prefix_in_pos_embed:
        assert torch.equal(m.pos_embed[:, :prefix_in_pos_embed], src_model.pos_embed[:, :prefix_in_pos_embed])
    report = timm_anysize.adaptation_report(m)
    assert report.by_action("resampled") == ["pos_embed"]
    assert set(report.entries) == set(m.state_dict())
    out = m(torch.randn(1, 3, *target))
    assert out.shape == (1, m.num_classes or m.num_features) and torch.isfinite(out).all()


def test_distilled_new_heads_are_both_initialized(make_checkpoint):
    path, _ = make_checkpoint("deit_tiny_distilled_patch16_224", img_size=64, **SMALL)
    name = variant(
        "deit_tiny_distilled_patch16_224", path, num_classes=7, model_args=SMALL, pretrained={"img_size": 64}
    )
    m = timm.create_model(name, pretrained=True)
    report = timm_anysize.adaptation_report(m)
    assert report.by_action("initialized") == ["head.weight", "head.bias", "head_dist.weight", "head_dist.bias"]
    assert sorted(report.dropped) == ["head.bias", "head.weight", "head_dist.bias", "head_dist.weight"]


def test_new_head_is_freshly_initialised_alone_and_seeded(make_checkpoint):
    # Only the tensors the checkpoint does not cover are initialised, as reset_classifier leaves a new head
    # (PyTorch's reset_parameters): the same seed gives the same head; every other tensor is the checkpoint's.
    path, base = make_checkpoint("test_vit")
    name = variant("test_vit", path, num_classes=10)
    torch.manual_seed(123)
    a = timm.create_model(name, pretrained=True)
    torch.manual_seed(123)
    b = timm.create_model(name, pretrained=True)
    assert torch.equal(a.head.weight, b.head.weight) and torch.equal(a.head.bias, b.head.bias)
    bound = 1 / a.head.weight.shape[1] ** 0.5  # nn.Linear's init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert a.head.weight.abs().max() <= bound and a.head.weight.std() > bound / 4
    assert all(torch.equal(a.state_dict()[k], v) for k, v in base.state_dict().items() if not k.startswith("head."))


def test_declared_init_and_drop_keys(make_checkpoint):
    path, base = make_checkpoint("test_vit")
    name = variant("test_vit", path, adapt={"init_keys": ["norm.*"]})
    m = timm.create_model(name, pretrained=True)
    report = timm_anysize.adaptation_report(m)
    assert report.by_action("initialized") == ["norm.weight", "norm.bias"]
    assert "adapt.init_keys" in report.dropped["norm.weight"]
    assert not torch.equal(m.norm.weight, base.norm.weight)


def test_extra_source_key_is_an_error_unless_declared(make_checkpoint, tmp_path):
    import safetensors.torch

    path, base = make_checkpoint("test_vit")
    sd = {**base.state_dict(), "mystery.weight": torch.ones(3)}
    safetensors.torch.save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(timm_anysize.AdaptationError, match="mystery.weight"):
        timm.create_model(variant("test_vit", tmp_path / "extra.safetensors"), pretrained=True)
    name = variant("test_vit", tmp_path / "extra.safetensors", adapt={"drop_keys": ["mystery.*"]})
    m = timm.create_model(name, pretrained=True)
    assert "adapt.drop_keys" in timm_anysize.adaptation_report(m).dropped["mystery.weight"]


def test_wrong_architecture_lists_missing_and_unexpected_keys(make_checkpoint):
    path, _ = make_checkpoint("test_vit", depth=2, class_token=False, global_pool="avg")
    with pytest.raises(timm_anysize.AdaptationError) as err:
        timm.create_model(variant("test_vit", path), pretrained=True)
    msg = str(err.value)
    assert "missing from the checkpoint" in msg and "blocks.{2..5}.norm1.weight" in msg and "cls_token" in msg
    assert str(path) in msg


def test_seed_recipe_with_a_copied_cfg(make_checkpoint):
    """timm 1.0.31 sends a copied cfg with custom_load=True to the npz loader; ours reads the file's format."""
    path, base = make_checkpoint("test_vit", ".pth")
    name = timm_anysize.register_variant(unique_name(), base="test_vit.r160_in1k", img_size=64, patch_size=4)
    cfg = timm.create_model(name).pretrained_cfg
    cfg["file"] = str(path)
    cfg["custom_load"] = True  # as inherited from a JAX-sourced base tag
    m = timm.create_model(name, pretrained=True, pretrained_cfg=cfg)
    assert torch.equal(m.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.weight)


def test_overlay_file_and_kwargs_override(make_checkpoint):
    path, base = make_checkpoint("test_vit")
    name = timm_anysize.register_variant(unique_name(), base="test_vit", img_size=64, patch_size=8)
    m = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), img_size=96, num_classes=3, in_chans=2
    )
    assert m.pretrained_cfg["input_size"] == (2, 96, 96) and m.pretrained_cfg["num_classes"] == 3
    assert len(m.pretrained_cfg["mean"]) == 2
    assert m(torch.randn(1, 2, 96, 96)).shape == (1, 3)
    assert timm_anysize.adaptation_report(m).entries["pos_embed"].target_shape == (1, 1 + 144, 64)


def test_device_and_dtype_follow_the_model(make_checkpoint):
    path, base = make_checkpoint("test_vit")
    name = variant("test_vit", path, img_size=64, patch_size=8)
    m = timm.create_model(name, pretrained=True).to(torch.bfloat16)
    out = m(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("old,new", [((7, 7), (8, 6)), ((4, 6), (4, 6)), ((8, 8), (5, 11))])
@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scriptable_rel_pos_table_resize_is_timms_bit_for_bit(old, new, flat, dtype):
    """The port the dynamic BEiT/MaxViT/GCViT paths script equals timm's resize_rel_pos_bias_table exactly, for the
    flat (Swin/BEiT) and the [heads, 2h-1, 2w-1] (TF MaxViT) layouts, and scripts: eagerly every head at once from
    the sizes' cached plan (hit on the second call), scripted head by head as timm; the gradient is timm's."""
    from timm.layers import resize_rel_pos_bias_table

    from timm_anysize.core import resample
    from timm_anysize.core.resample import resize_rel_pos_table

    shape = ((2 * old[0] - 1) * (2 * old[1] - 1), 3) if flat else (3, 2 * old[0] - 1, 2 * old[1] - 1)
    table = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
    new_shape = ((2 * new[0] - 1) * (2 * new[1] - 1), 3) if flat else (3, 2 * new[0] - 1, 2 * new[1] - 1)
    expected = resize_rel_pos_bias_table(table, new_window_size=new, new_bias_shape=new_shape)
    hits = []
    for fn in (resize_rel_pos_table, resize_rel_pos_table, torch.jit.script(resize_rel_pos_table)):
        hits.append(resample._rel_table_plan.cache_info().hits)
        got = fn(table, list(old), list(new), flat)
        assert got.shape == expected.shape and got.dtype == dtype and torch.equal(got, expected)
    assert old == new or hits[2] == hits[1] + 1  # the second eager call found its plan
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.enable_grad():  # the module's fixture turns gradients off
        ours = resize_rel_pos_table(table, list(old), list(new), flat)
        theirs = resize_rel_pos_bias_table(table, new_window_size=new, new_bias_shape=new_shape)
        (grad,) = torch.autograd.grad((ours * weights).sum(), table)
        (timm_grad,) = torch.autograd.grad((theirs * weights).sum(), table)
    torch.testing.assert_close(grad, timm_grad, rtol=0, atol=0 if old == new else 1e-5)


def test_load_and_run_time_resample_position_embeddings_through_one_function(make_checkpoint, monkeypatch):
    """A load (``adapt.resample_pos_embed``) and the dynamic paths (``core.runtime_options``) resample token position
    embeddings with the one ``core.resample.resample_pos_tokens``: the same function object, bit-identical results
    on a grid change with prefix tokens, and a loaded variant's embedding is the dynamic model's at its grid."""
    from timm_anysize import adapt
    from timm_anysize.core import resample, runtime_options
    from timm_anysize.core.spec import PosEmbedOptions

    assert runtime_options.resample_pos_tokens is resample.resample_pos_tokens is adapt.resample_pos_tokens
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[1:3])
        return resample.resample_pos_tokens(*args, **kwargs)

    pe = torch.randn(1, 3 + 4 * 6, 16)  # class + 2 registers
    for compat in ("timm", "dino"):
        options = PosEmbedOptions(compat=compat)
        runtime = runtime_options.resample_pos_tokens(
            pe, [7, 3], [4, 6], 3, options.interpolation, options.use_antialias, options.compat
        )
        with monkeypatch.context() as m:
            m.setattr(adapt, "resample_pos_tokens", spy)
            loaded = adapt.resample_pos_embed(pe, (4, 6), (7, 3), 3, options)
        assert torch.equal(loaded, runtime) and loaded.shape == (1, 3 + 7 * 3, 16)
    assert calls == [([7, 3], [4, 6])] * 2  # adapt's entry point is a thin wrapper of it

    path, base = make_checkpoint("test_vit")  # 160 px, patch 16: a 10x10 grid and a class token
    loaded = timm.create_model(variant("test_vit", path, img_size=[96, 128]), pretrained=True)
    dynamic = timm_anysize.enable_dynamic(base)
    assert torch.equal(loaded.pos_embed, runtime_options.dynamic_pos_embed(dynamic, (6, 8)))
