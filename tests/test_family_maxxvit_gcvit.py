"""MaxViT / CoAtNet (timm's ``maxxvit``) and GCViT: every relative-position table resized as timm resizes it."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from script_fx import fx_model
from timm.layers import resize_rel_pos_bias_table
from timm.models.maxxvit import checkpoint_filter_fn

import timm_anysize
from conftest import unique_name

MAXXVIT = dict(embed_dim=(16, 32, 48, 64), depths=(1, 1, 1, 1), stem_width=(16, 16), transformer_dim_head=16)
GCVIT = dict(embed_dim=16, mlp_ratio=1.0)
# one base per kind of relative position: flat tables (rw), TF tables [heads, 2h-1, 2w-1], MLP (no table), CoAtNet
# (a transformer stage's table spans its whole feature map)
MAXXVIT_BASES = ["maxvit_nano_rw_256", "maxvit_tiny_tf_224", "maxvit_rmlp_pico_rw_256", "coatnet_pico_rw_224"]


def _load(make_checkpoint, arch: str, args: dict, img_size):
    path, base = make_checkpoint(arch, img_size=64, **args)
    name = timm_anysize.register_variant(
        unique_name(), base=arch, model_args=args, img_size=img_size, pretrained={"file": str(path), "img_size": 64}
    )
    return base, timm.create_model(name, pretrained=True).eval()


@pytest.mark.parametrize("img_size", [96, [128, 64]], ids=["96", "128x64"])
@pytest.mark.parametrize("arch", MAXXVIT_BASES)
def test_maxxvit_load_equals_timm_set_input_size(make_checkpoint, arch, img_size):
    """Each table equals timm's own ``set_input_size`` on the base, and (square) its ``checkpoint_filter_fn``."""
    base, model = _load(make_checkpoint, arch, MAXXVIT, img_size)
    report = timm_anysize.adaptation_report(model)
    ref = copy.deepcopy(base)
    ref.set_input_size(img_size=img_size)
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    for key in sd:
        assert torch.equal(sd[key], ref_sd[key]), key
    resampled = {k for k, e in report.entries.items() if e.action == "resampled"}
    assert resampled == {k for k in sd if k.endswith("relative_position_bias_table")}
    assert bool(resampled) is ("rmlp" not in arch)
    if isinstance(img_size, int):
        timm_model = timm.create_model(arch, img_size=img_size, **MAXXVIT)
        filtered = checkpoint_filter_fn(base.state_dict(), timm_model)
        assert all(torch.equal(sd[k], filtered[k]) for k in sd)
    x = torch.randn(2, 3, *((img_size,) * 2 if isinstance(img_size, int) else img_size))
    with torch.no_grad():
        assert torch.equal(model(x), ref.eval()(x))


@pytest.mark.parametrize("img_size", [96, [128, 64]], ids=["96", "128x64"])
def test_gcvit_load_resizes_every_table_with_timm_between_the_windows_of_its_block(make_checkpoint, img_size):
    base, model = _load(make_checkpoint, "gcvit_xxtiny", GCVIT, img_size)
    hw = (img_size,) * 2 if isinstance(img_size, int) else tuple(img_size)
    plain = timm.create_model("gcvit_xxtiny", img_size=hw, **GCVIT)
    sd, src = model.state_dict(), base.state_dict()
    tables = [k for k in sd if k.endswith("relative_position_bias_table")]
    assert len(tables) == 12
    for key in tables:
        owner = key.rsplit(".", 1)[0]
        old, new = base.get_submodule(owner).window_size, plain.get_submodule(owner).window_size
        assert tuple(new) == tuple(model.get_submodule(owner).window_size) != tuple(old)
        expected = resize_rel_pos_bias_table(
            src[key], new_window_size=new, new_bias_shape=sd[key].shape, old_window_size=old
        )
        assert torch.equal(sd[key], expected), key
    assert all(torch.equal(sd[k], src[k]) for k in sd if k not in tables)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, *hw))).all()


def _trained(arch: str, args: dict, img_size: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(arch, img_size=img_size, **args).eval()
    with torch.no_grad():  # non-trivial tables (timm initialises some at zero)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("arch", MAXXVIT_BASES)
def test_maxxvit_at_any_size_equals_timm_built_for_it(arch):
    """enable_dynamic: at each size the outputs are bit-identical to timm's own model moved there with
    ``set_input_size`` (tables resized as a load resizes them); a size off the partitions is padded bottom/right."""
    base = _trained(arch, MAXXVIT)
    model = timm_anysize.enable_dynamic(copy.deepcopy(base))
    for hw, built in (((64, 64), (64, 64)), ((96, 64), (96, 64)), ((128, 96), (128, 96)), ((64, 129), (64, 160))):
        ref = copy.deepcopy(base)
        ref.set_input_size(img_size=built)
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            out = model(x)
            assert torch.equal(out, ref(torch.nn.functional.pad(x, (0, built[1] - hw[1])))), hw
            feats = model.forward_intermediates(x, intermediates_only=True)
            assert [f.shape[-2:] for f in feats] == [
                f.shape[-2:]
                for f in ref.forward_intermediates(
                    torch.nn.functional.pad(x, (0, built[1] - hw[1])), intermediates_only=True
                )
            ]


def test_maxxvit_without_padding_names_the_multiple_and_trains_its_tables_at_another_size():
    model = timm_anysize.enable_dynamic(_trained("maxvit_nano_rw_256", MAXXVIT), pad=False)
    with pytest.raises(
        timm_anysize.InputNotDivisibleError, match=r"input 64x70 is not a multiple of .* 32x32 and padding is off"
    ) as err:
        model(torch.randn(1, 3, 64, 70))
    assert (err.value.size, err.value.multiple) == ((64, 70), (32, 32))
    model.train()
    model(torch.randn(2, 3, 96, 64)).sum().backward()  # the resized bias is computed inline: gradients reach it
    table = model.stages[0].blocks[0].attn_block.attn.rel_pos.relative_position_bias_table
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_maxxvit_size_off_the_partitions_is_rejected_with_the_nearest_that_work():
    with pytest.raises(
        timm_anysize.SpecError,
        match=r"cannot run at \[80, 80\].*not a multiple of its patch 32; "
        r"nearest heights that work: 64 or 96",
    ):
        timm_anysize.register_variant(unique_name(), base="maxvit_nano_rw_256", model_args=MAXXVIT, img_size=80)


def _gcvit_built_for(base: torch.nn.Module, size) -> torch.nn.Module:
    """timm's GCViT built for ``size``, its tables resized from ``base``'s with timm's function."""
    ref = timm.create_model("gcvit_xxtiny", img_size=size, **GCVIT).eval()
    target = ref.state_dict()
    weights = {}
    for key, value in base.state_dict().items():
        if key.endswith("relative_position_bias_table"):
            owner = key.rsplit(".", 1)[0]
            value = resize_rel_pos_bias_table(
                value,
                new_window_size=ref.get_submodule(owner).window_size,
                new_bias_shape=target[key].shape,
                old_window_size=base.get_submodule(owner).window_size,
            )
        weights[key] = value
    ref.load_state_dict(weights)
    return ref


def test_gcvit_at_any_size_equals_timm_built_for_it():
    """enable_dynamic: windows and global queries of each size, bit-identical to timm's model built for it (a size
    off the windows: padded bottom/right)."""
    base = _trained("gcvit_xxtiny", GCVIT)
    model = timm_anysize.enable_dynamic(copy.deepcopy(base))
    for hw, built in (((64, 64), (64, 64)), ((96, 64), (96, 64)), ((128, 96), (128, 96)), ((64, 129), (64, 160))):
        x = torch.randn(2, 3, *hw)
        ref = _gcvit_built_for(base, built)
        with torch.no_grad():
            assert torch.equal(model(x), ref(torch.nn.functional.pad(x, (0, built[1] - hw[1])))), hw
    with pytest.raises(
        timm_anysize.InputNotDivisibleError, match=r"input 64x70 is not a multiple of .* 32x32 and padding is off"
    ) as err:
        timm_anysize.enable_dynamic(model, pad=False)(torch.randn(1, 3, 64, 70))
    assert (err.value.size, err.value.multiple) == ((64, 70), (32, 32))


SCRIPT_FX = [(arch, MAXXVIT) for arch in MAXXVIT_BASES] + [("gcvit_xxtiny", GCVIT)]


@pytest.mark.parametrize("arch,args", SCRIPT_FX, ids=[a for a, _ in SCRIPT_FX])
def test_torchscript_and_fx_equal_eager_at_any_size(make_checkpoint, arch, args):
    """A registered variant (96x64 from 64 px weights) scripted, and FX-traced, gives the eager outputs bit for bit
    at its size, at another and at one that is padded (the scripted path resizes tables with the ports of timm's
    functions)."""
    path, _ = make_checkpoint(arch, img_size=64, **args)
    name = timm_anysize.register_variant(
        unique_name(), base=arch, model_args=args, img_size=[96, 64], pretrained={"file": str(path), "img_size": 64}
    )
    model = timm.create_model(name, pretrained=True).eval()
    scripted, traced = torch.jit.script(model), fx_model(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for hw in ((96, 64), (64, 128), (64, 97)):
            x = torch.randn(2, 3, *hw, generator=gen)
            out = model(x)
            assert torch.equal(scripted(x), out), hw
            assert torch.equal(next(iter(traced(x).values())), out), hw


def test_forward_intermediates_at_another_size_equal_a_model_built_for_it():
    base = _trained("maxvit_nano_rw_256", MAXXVIT)
    model = timm_anysize.enable_dynamic(copy.deepcopy(base))
    ref = copy.deepcopy(base)
    ref.set_input_size(img_size=(128, 96))
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        got, want = model.forward_intermediates(x), ref.forward_intermediates(x)
    assert torch.equal(got[0], want[0]) and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    gc_base = _trained("gcvit_xxtiny", GCVIT)
    gc = timm_anysize.enable_dynamic(copy.deepcopy(gc_base))
    with torch.no_grad():
        got = gc.forward_intermediates(x, intermediates_only=True)
        want = _gcvit_built_for(gc_base, (128, 96)).forward_intermediates(x, intermediates_only=True)
    assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("arch,args", [SCRIPT_FX[0], SCRIPT_FX[-1]], ids=["maxxvit", "gcvit"])
def test_fx_feature_model_runs_at_any_size_with_the_dynamic_model_features(make_checkpoint, arch, args):
    """``features_only=True, feature_cls='fx'`` traces the dynamic model: any size, the features of
    ``forward_intermediates`` (timm's default feature wrapper takes the variant's size: ``dynamic_features``)."""
    path, _ = make_checkpoint(arch, img_size=64, **args)
    name = timm_anysize.register_variant(
        unique_name(), base=arch, model_args=args, img_size=96, pretrained={"file": str(path), "img_size": 64}
    )
    feats = timm.create_model(name, pretrained=True, features_only=True, feature_cls="fx", out_indices=(0, 1, 2))
    model = timm.create_model(name, pretrained=True).eval()
    assert feats.eval().pretrained_cfg["fixed_input_size"] is False
    for hw in ((96, 96), (128, 64)):
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            got, want = feats(x), model.forward_intermediates(x, indices=[0, 1, 2], intermediates_only=True)
        assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, want)), hw


WIDE = dict(embed_dim=(64, 64, 128, 128), depths=(1, 1, 1, 1), stem_width=(16, 32), transformer_dim_head=32)
BLOCK_KINDS = {  # (ConvNeXt blocks want widths their groups divide)
    "parallel": ("maxvit_tiny_pm_256", WIDE),  # ParallelPartitionAttention
    "nchw": ("maxvit_nano_rw_256", dict(WIDE, transformer_use_nchw_attn=True)),  # PartitionAttention2d
    "convnext_grid_only": ("maxxvitv2_nano_rw_256", WIDE),  # no block attention
    "coatnext": ("coatnext_nano_rw_224", WIDE),
}


@pytest.mark.parametrize("kind", list(BLOCK_KINDS))
def test_every_maxxvit_block_kind_at_any_size_equals_timm_built_for_it(kind):
    arch, args = BLOCK_KINDS[kind]
    base = _trained(arch, args)
    model = timm_anysize.enable_dynamic(copy.deepcopy(base))
    scripted = torch.jit.script(model)
    for hw in ((64, 64), (128, 96)):
        ref = copy.deepcopy(base)
        ref.set_input_size(img_size=hw)
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            out = model(x)
            assert torch.equal(out, ref(x)) and torch.equal(scripted(x), out), hw
