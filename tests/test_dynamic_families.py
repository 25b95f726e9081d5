"""BEiT and CaiT at any input size: BEiT bias tables per grid equal timm's set_input_size bit for bit, cached per grid;
CaiT's position embedding resampled with no prefix."""

from __future__ import annotations

import copy
import threading

import pytest
import timm
import torch

import timm_anysize
from timm_anysize.core.family import tensor_layouts
from timm_anysize.core.runtime_options import cache_for
from timm_anysize.families import FAMILIES

SMALL = dict(embed_dim=64, depth=2, num_heads=2, img_size=64)


@pytest.mark.parametrize(
    "args",
    [
        {},
        dict(use_abs_pos_emb=True),
        dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=False),
    ],
    ids=["rel_pos", "abs_pos", "shared_rel_pos"],
)
def test_any_size_equals_set_input_size(args):
    base = _perturbed("beit_base_patch16_224", **SMALL, **args)  # non-zero tables
    model = timm_anysize.enable_dynamic(copy.deepcopy(base))
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        assert torch.equal(model(x), base(x))  # own size: timm's own path
        for hw in [(96, 64), (48, 112)]:
            moved = copy.deepcopy(base)
            moved.set_input_size(img_size=hw)
            x = torch.randn(2, 3, *hw)
            assert torch.equal(model(x), moved(x)), hw


def test_tables_are_cached_per_grid_and_follow_the_weights():
    model = timm_anysize.enable_dynamic(timm.create_model("beit_base_patch16_224", **SMALL).eval())
    attn = model.blocks[0].attn
    with torch.no_grad():
        a = model(torch.randn(1, 3, 96, 80))
        model(torch.randn(1, 3, 96, 80))
        assert cache_for(attn, "relative_position_bias_table").info()["hits"] == 1
        attn.relative_position_bias_table.add_(1.0)  # an in-place write: the cached table is stale
        b = model(torch.randn(1, 3, 96, 80))
    assert cache_for(attn, "relative_position_bias_table").info()["invalidations"] == 1 and not torch.equal(a, b)


def test_gradients_reach_the_table_at_other_sizes():
    model = timm_anysize.enable_dynamic(timm.create_model("beit_base_patch16_224", **SMALL))
    model(torch.randn(1, 3, 80, 96)).sum().backward()
    assert model.blocks[0].attn.relative_position_bias_table.grad.abs().sum() > 0


def test_threads_at_different_sizes_do_not_mix_grids():
    model = timm_anysize.enable_dynamic(timm.create_model("beit_base_patch16_224", **SMALL).eval())
    sizes = [(64, 64), (96, 48), (48, 80), (80, 80)] * 4
    inputs = [torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(i)) for i, hw in enumerate(sizes)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    results, errors = [None] * len(inputs), []

    def run(i):
        try:
            with torch.no_grad():
                results[i] = model(inputs[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(torch.equal(r, e) for r, e in zip(results, expected))


def test_cait_at_any_size_equals_a_cait_built_for_that_size():
    """CaiT's position embedding covers patch tokens only (the class token joins later): resampled with no prefix."""
    from timm.layers import resample_abs_pos_embed

    args = dict(embed_dim=64, depth=2, num_heads=2, depth_token_only=1)
    torch.manual_seed(0)
    base = timm.create_model("cait_xxs24_224", img_size=64, **args).eval()
    model = timm_anysize.enable_dynamic(copy.deepcopy(base))
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        assert torch.equal(model(x), base(x))
        for hw in [(96, 64), (48, 112)]:
            built = timm.create_model("cait_xxs24_224", img_size=hw, **args).eval()
            sd = dict(base.state_dict())
            sd["pos_embed"] = resample_abs_pos_embed(
                sd["pos_embed"], new_size=[hw[0] // 16, hw[1] // 16], old_size=[4, 4], num_prefix_tokens=0
            )
            built.load_state_dict(sd)
            x = torch.randn(2, 3, *hw)
            assert torch.equal(model(x), built(x)), hw


def _resampled_image(pe, grid, channels_last):
    from timm.layers import resample_abs_pos_embed_nhwc

    nhwc = pe if channels_last else pe.permute(0, 2, 3, 1)
    out = resample_abs_pos_embed_nhwc(nhwc, list(grid), interpolation="bicubic", antialias=True)
    return out if channels_last else out.permute(0, 3, 1, 2)


def assert_matches_base_and_built(model, base, built, own, other):
    """At its own size the dynamic model is the timm base; at another size, the timm model built for that size."""
    with torch.no_grad():
        for reference, hw in ((base, own), (built, other)):
            x = torch.randn(2, 3, *hw)
            assert torch.equal(model(x), reference(x)), hw


def _perturbed(arch, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(arch, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


# The rows that enable_dynamic makes run at any size whose only geometry-dependent tensors are position embeddings
# laid out as images (on the grid a conv stem gives).
IMAGE_POS = [
    f
    for f in FAMILIES
    if f.dynamic == "cached" and f.tensors and all(kind in ("pos_nchw", "pos_nhwc") for _, kind in f.tensors)
]


@pytest.mark.parametrize("family", IMAGE_POS, ids=lambda f: f.name)
def test_conv_stem_families_at_any_size_equal_the_model_built_for_it(family):
    """PiT / VOLO / Visformer: position embeddings laid out as images, resampled to the grid the stem gives the
    input: equal to timm's model built for that size, with the embeddings resampled by hand."""
    arch, args, size, step = family.example, family.tiny.model_args, family.tiny.img_size, family.tiny.step
    base = _perturbed(arch, img_size=size, **args)
    model = timm_anysize.enable_dynamic(copy.deepcopy(base))
    for other in [(size + 2 * step, size + step), (size + 2 * step, size - step)]:
        built = timm.create_model(arch, img_size=other, **args).eval()
        sd, target = dict(base.state_dict()), built.state_dict()
        for key, kind in tensor_layouts(family, sd).items():
            channels_last = kind == "pos_nhwc"
            grid = target[key].shape[1:3] if channels_last else target[key].shape[2:4]
            sd[key] = _resampled_image(sd[key], grid, channels_last)
        built.load_state_dict(sd)
        assert_matches_base_and_built(model, base, built, (size, size), other)


def test_crossvit_branches_follow_the_input_size():
    """Each branch keeps its ratio to the input (240 -> 240 / 224 at 240 px) and gets its embedding resampled."""
    from timm.layers import resample_abs_pos_embed

    args = dict(embed_dim=[32, 64], depth=[[1, 1, 0]], num_heads=[1, 1])
    base = _perturbed("crossvit_tiny_240", img_size=240, **args)
    model = timm_anysize.enable_dynamic(copy.deepcopy(base))
    built = timm.create_model("crossvit_tiny_240", img_size=360, **args).eval()  # branches 360 / 336 px
    sd = dict(base.state_dict())
    for i, (old, new) in enumerate([((20, 20), (30, 30)), ((14, 14), (21, 21))]):
        sd[f"pos_embed_{i}"] = resample_abs_pos_embed(
            sd[f"pos_embed_{i}"], new_size=list(new), old_size=list(old), num_prefix_tokens=1
        )
    built.load_state_dict(sd)
    assert_matches_base_and_built(model, base, built, (240, 240), (360, 360))
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 200, 280))).all()


@pytest.mark.parametrize("args", [{}, dict(abs_win_pos_embed=True)], ids=["pos_embed", "abs_win_pos_embed"])
def test_hiera_at_any_size_equals_the_model_built_for_it(args):
    """The unroll is rebuilt for the input's grid; the position embedding resampled (token layout, no prefix)."""
    from timm.layers import resample_abs_pos_embed

    small = dict(embed_dim=32, num_heads=1, stages=(1, 1, 1, 1), **args)
    base = _perturbed("hiera_tiny_224", img_size=64, **small)
    model = timm_anysize.enable_dynamic(copy.deepcopy(base))
    built = timm.create_model("hiera_tiny_224", img_size=(96, 128), **small).eval()
    sd = dict(base.state_dict())
    if not args:
        sd["pos_embed"] = resample_abs_pos_embed(
            sd["pos_embed"], new_size=[24, 32], old_size=[16, 16], num_prefix_tokens=0
        )
    built.load_state_dict(sd)
    assert_matches_base_and_built(model, base, built, (64, 64), (96, 128))
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 70, 100))).all()  # padded to 96 x 128


def test_hiera_without_padding_names_the_mask_unit():
    model = timm_anysize.enable_dynamic(timm.create_model("hiera_tiny_224", img_size=64).eval(), pad=False)
    with pytest.raises(
        timm_anysize.InputNotDivisibleError, match=r"not a multiple of Hiera's mask unit .*32x32"
    ) as err:
        model(torch.randn(1, 3, 70, 96))
    assert (err.value.size, err.value.multiple) == ((70, 96), (32, 32))


@pytest.mark.parametrize("arch", ["levit_128s", "levit_conv_128s"])
def test_levit_at_any_size_equals_the_model_built_for_it(arch):
    """Every stage at the resolution the input gives it; biases resized as a load at that size resizes them."""
    from timm_anysize.core.resample import resize_bias_grid

    small = dict(embed_dim=(32, 48, 64), depth=(1, 1, 1), num_heads=(1, 1, 1), key_dim=8)
    base = _perturbed(arch, img_size=64, **small)
    model = timm_anysize.enable_dynamic(copy.deepcopy(base))
    built = timm.create_model(arch, img_size=(96, 80), **small).eval()
    sd = dict(base.state_dict())
    modules = dict(built.named_modules())
    for key in sd:
        if key.endswith("attention_biases"):
            new = tuple(modules[key.rsplit(".", 1)[0]].resolution)
            old = tuple(dict(base.named_modules())[key.rsplit(".", 1)[0]].resolution)
            sd[key] = resize_bias_grid(sd[key], old, new, "bicubic")
    built.load_state_dict(sd)
    assert_matches_base_and_built(model, base, built, (64, 64), (96, 80))


def test_mvitv2_at_any_size_equals_the_model_built_for_it():
    """Each axis's tables resized to the length the size needs (linear), as a load at that size resizes them."""
    from timm_anysize.core.resample import resize_rel_axis

    base = _perturbed("mvitv2_tiny", img_size=64)
    model = timm_anysize.enable_dynamic(copy.deepcopy(base))
    built = timm.create_model("mvitv2_tiny", img_size=96).eval()
    target = built.state_dict()
    sd = {k: resize_rel_axis(v, target[k].shape[0]) if "rel_pos_" in k else v for k, v in base.state_dict().items()}
    built.load_state_dict(sd)
    assert_matches_base_and_built(model, base, built, (64, 64), (96, 96))
    with torch.no_grad():
        # non-square, and sizes the strides do not divide: every table index stays in range
        for hw in [(96, 64), (64, 97), (33, 47)]:
            assert torch.isfinite(model(torch.randn(1, 3, *hw))).all(), hw


def test_beit_intermediates_at_any_size_equal_set_input_size():
    base = _perturbed("beit_base_patch16_224", **SMALL)
    model = timm_anysize.enable_dynamic(copy.deepcopy(base))
    moved = copy.deepcopy(base)
    moved.set_input_size(img_size=(96, 48))
    x = torch.randn(1, 3, 96, 48)
    with torch.no_grad():
        ours = model.forward_intermediates(x, indices=2, intermediates_only=True)
        theirs = moved.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [tuple(t.shape) for t in ours] == [(1, 64, 6, 3)] * 2
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
