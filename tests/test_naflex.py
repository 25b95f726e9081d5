"""``use_naflex=True`` on a variant (issue 31, items 2-3): timm's NaFlexVit with the variant's adapted weights, whose
output for each image of a NaFlex batch (padded to a longer sequence, through timm's own ``create_naflex_loader``
too) equals the variant's dynamic forward on that image alone, within 1e-5 in float32, with each origin's compat
resampling rule."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import yaml
from timm.data import ImageDataset, create_naflex_loader
from timm.models import naflexvit

import timm_anysize
from conftest import unique_name
from timm_anysize.naflex import ScaleFactorNaFlexEmbeds

TINY_VIT = dict(embed_dim=64, depth=2, num_heads=2)
# (base, model_args, checkpoint size, variant size, patch, channels): a ViT at another patch size and one channel,
# one with registers and no class token (average pooling), an EVA-02 (RoPE, SwiGLU) at its own patch.
CASES = {
    "vit_patch8_gray": ("vit_tiny_patch16_224", TINY_VIT, 64, [48, 80], 8, 1),
    "vit_reg_avg": (
        "vit_tiny_patch16_224",
        dict(TINY_VIT, reg_tokens=2, class_token=False, global_pool="avg", no_embed_class=True),
        64,
        64,
        16,
        3,
    ),
    "eva02": ("eva02_tiny_patch14_224", TINY_VIT, 56, [56, 84], 14, 3),
}


def _checkpoint(base: str, args: dict, size: int, path) -> str:
    torch.manual_seed(0)
    model = timm.create_model(base, img_size=size, **args)
    with torch.no_grad():  # non-zero position embeddings and tokens: their conversion must show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch.save(model.state_dict(), path)
    return str(path)


def register_case(case: str, tmp_path, **spec) -> str:
    """The case's variant over a seeded checkpoint of its base (in ``tmp_path``), registered; its name."""
    base, args, size, img_size, patch, chans = CASES[case]
    return timm_anysize.register_variant(
        unique_name("nf"),
        base=base,
        model_args=args,
        img_size=img_size,
        patch_size=patch,
        in_chans=chans,
        pretrained={"file": _checkpoint(base, args, size, tmp_path / "w.pt"), "img_size": size},
        **spec,
    )


def variant(case: str, tmp_path, **spec) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The case's dynamic variant and the same variant with ``use_naflex=True`` (eval)."""
    name = register_case(case, tmp_path, **spec)
    dynamic = timm.create_model(name, pretrained=True).eval()
    naflex = timm.create_model(name, pretrained=True, use_naflex=True).eval()
    return dynamic, naflex


def naflex_batch(images: list[torch.Tensor], patch: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Images (each ``[C, H, W]``, whole patches) as a NaFlex batch padded to ``seq_len`` (timm's layout: patches
    ``(ph, pw, C)`` flattened, row-major over the grid, ``(y, x)`` coordinates)."""
    n = len(images)
    dim = patch * patch * images[0].shape[0]
    batch = dict(
        patches=torch.zeros(n, seq_len, dim),
        patch_coord=torch.zeros(n, seq_len, 2, dtype=torch.long),
        patch_valid=torch.zeros(n, seq_len, dtype=torch.bool),
    )
    for i, img in enumerate(images):
        patches, (gh, gw) = naflexvit.batch_patchify(img[None], (patch, patch))
        count = gh * gw
        ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        batch["patches"][i, :count] = patches[0]
        batch["patch_coord"][i, :count] = torch.stack([ys.flatten(), xs.flatten()], -1)
        batch["patch_valid"][i, :count] = True
    return batch


def unpatchify(patches: torch.Tensor, coord: torch.Tensor, valid: torch.Tensor, patch: int, chans: int):
    """One sample of a NaFlex batch back as the image ``[C, H, W]`` its valid patches tile."""
    patches, coord = patches[valid], coord[valid]
    gh, gw = (int(c) + 1 for c in coord.max(0).values)
    grid = torch.zeros(gh, gw, patch, patch, chans)
    grid[coord[:, 0], coord[:, 1]] = patches.reshape(-1, patch, patch, chans)
    return grid.permute(4, 0, 2, 1, 3).reshape(chans, gh * patch, gw * patch)


@pytest.mark.parametrize("case", list(CASES))
def test_naflex_batch_equals_the_dynamic_forward_on_each_image_alone(case, tmp_path):
    dynamic, naflex = variant(case, tmp_path)
    _, _, _, _, patch, chans = CASES[case]
    assert isinstance(naflex, naflexvit.NaFlexVit)
    assert naflex.pretrained_cfg == dynamic.pretrained_cfg
    gen = torch.Generator().manual_seed(0)
    sizes = [(patch * 4, patch * 4), (patch * 3, patch * 6), (patch * 7, patch * 2), (patch * 1, patch * 5)]
    images = [torch.randn(chans, *hw, generator=gen) for hw in sizes]
    longest = max(h * w for h, w in sizes) // patch**2
    with torch.no_grad():
        alone = torch.cat([dynamic(img[None]) for img in images])
        for seq_len in (longest, longest + 13):  # padded to the longest image, and beyond
            out = naflex(naflex_batch(images, patch, seq_len))
            torch.testing.assert_close(out, alone, rtol=0, atol=1e-5)
        for img, expected in zip(images, alone):  # plain images too
            torch.testing.assert_close(naflex(img[None])[0], expected, rtol=0, atol=1e-5)
        odd = torch.randn(1, chans, patch * 3 + 5, patch * 2 - 3, generator=gen)  # padded to whole patches by both
        torch.testing.assert_close(naflex(odd), dynamic(odd), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_padding_never_changes_a_valid_token(case, tmp_path):
    _, naflex = variant(case, tmp_path)
    _, _, _, _, patch, chans = CASES[case]
    img = torch.randn(chans, patch * 3, patch * 5)
    with torch.no_grad():
        tight, padded = (naflex.forward_features(**naflex_batch([img], patch, n))["patches"] for n in (15, 40))
    assert tight.shape[1] + 25 == padded.shape[1]
    torch.testing.assert_close(padded[:, : tight.shape[1]], tight, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["vit_reg_avg", "eva02"])
@pytest.mark.parametrize("is_training", [False, True], ids=["validate", "train"])
def test_naflex_loader_batches_equal_the_dynamic_forward_per_image(case, is_training, image_folder, tmp_path):
    """timm's own ``create_naflex_loader`` (as train.py / validate.py ``--naflex-loader``): each sample of its padded
    batches, through NaFlexVit, equals the dynamic variant on the image its valid patches tile."""
    dynamic, naflex = variant(case, tmp_path)
    _, _, _, _, patch, chans = CASES[case]
    loader = create_naflex_loader(
        ImageDataset(image_folder),
        patch_size=patch,
        train_seq_lens=(24, 40),
        max_seq_len=40,
        batch_size=2,
        is_training=is_training,
        use_prefetcher=False,
        num_workers=0,
        device=torch.device("cpu"),
    )
    checked = padded = 0
    with torch.no_grad():
        for batch, _ in loader:
            padded += int(batch["patch_valid"].sum(1).min() < batch["patches"].shape[1])
            out = naflex(batch)
            for i in range(out.shape[0]):
                img = unpatchify(batch["patches"][i], batch["patch_coord"][i], batch["patch_valid"][i], patch, chans)
                torch.testing.assert_close(out[i], dynamic(img[None])[0], rtol=0, atol=1e-5)
                checked += 1
    assert checked >= 2 and (padded > 0 or is_training)  # validation pads every batch to max_seq_len


@pytest.mark.parametrize("compat", ["torchvision", "transformers", "mmpretrain", "big_vision", "dino"])
def test_each_origins_resampling_rule_holds_in_the_naflex_path(compat, tmp_path):
    """The origin's compat preset (its library's interpolation, antialiasing, corner alignment; DINO's scale factor)
    is the NaFlex path's, in a padded NaFlex batch and for plain images, the native grid (no resampling) included."""
    dynamic, naflex = variant("vit_patch8_gray", tmp_path, adapt={"pos_embed": {"compat": compat}})
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(1, *hw, generator=gen) for hw in [(40, 96), (24, 24), (64, 56), (48, 80)]]
    with torch.no_grad():
        alone = torch.cat([dynamic(img[None]) for img in images])
        torch.testing.assert_close(naflex(naflex_batch(images, 8, 100)), alone, rtol=0, atol=1e-5)
        for img, expected in zip(images, alone):
            torch.testing.assert_close(naflex(img[None])[0], expected, rtol=0, atol=1e-5)


def test_dinos_scale_factor_is_not_a_resize_to_the_size(tmp_path):
    """DINO's rule samples the grid at other points than NaFlexVit's own resize to the same size: the DINO variant's
    NaFlex path must differ from a NaFlexVit left with timm's size-based resampling (else the test above could not
    fail), and train (a gradient reaches the single stored grid)."""
    _, naflex = variant("vit_patch8_gray", tmp_path, adapt={"pos_embed": {"compat": "dino"}})
    assert isinstance(naflex.embeds, ScaleFactorNaFlexEmbeds)
    by_size = copy.deepcopy(naflex)
    by_size.embeds.__class__ = naflexvit.NaFlexEmbeds  # NaFlexVit's own resampling, DINO's mode and corners
    img = torch.randn(1, 1, 40, 96)
    with torch.no_grad():
        assert (naflex(img) - by_size(img)).abs().max() > 1e-4
    naflex.train()
    naflex(naflex_batch([img[0], img[0, :, :24, :32]], 8, 64)).sum().backward()
    assert naflex.embeds.pos_embed.grad is not None and naflex.embeds.pos_embed.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "base, args",
    [
        (
            "swin_tiny_patch4_window7_224",
            dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4),
        ),
        ("deit_tiny_distilled_patch16_224", TINY_VIT),
    ],
    ids=["windowed", "distillation-token"],
)
def test_a_family_without_a_naflex_form_names_those_with_one(base, args):
    name = timm_anysize.register_variant(unique_name("nf"), base=base, model_args=args, img_size=64)
    with pytest.raises(timm_anysize.SpecError, match=r"use_naflex=True: .*NaFlexVit form.* vit, eva, naflexvit"):
        timm.create_model(name, use_naflex=True)


@pytest.mark.parametrize("case", ["vit_patch8_gray", "eva02"])
def test_model_args_use_naflex_in_yaml_converts_classic_weights(case, tmp_path):
    """``model_args: {use_naflex: true}`` in a variant's YAML, over a classic ViT/EVA checkpoint, builds the NaFlexVit
    with the adapted weights: the same model as ``use_naflex=True`` at create_model (timm's own keyword, on timm's
    classic weights, converts the same way)."""
    base, args, size, img_size, patch, chans = CASES[case]
    checkpoint = _checkpoint(base, args, size, tmp_path / "w.pt")
    name = unique_name("nfy")
    spec = dict(base=base, model_args=dict(args, use_naflex=True), img_size=img_size, patch_size=patch, in_chans=chans)
    (tmp_path / "v.yaml").write_text(
        yaml.safe_dump({"variants": {name: dict(spec, pretrained={"file": checkpoint, "img_size": size})}})
    )
    assert timm_anysize.register_yaml(tmp_path / "v.yaml") == [name]
    from_yaml = timm.create_model(name, pretrained=True).eval()
    _, keyword = variant(case, tmp_path)
    assert isinstance(from_yaml, naflexvit.NaFlexVit)
    assert from_yaml.pretrained_cfg["input_size"] == keyword.pretrained_cfg["input_size"]
    assert (
        timm_anysize.adaptation_report(from_yaml).entries.keys()
        == timm_anysize.adaptation_report(keyword).entries.keys()
    )
    state, expected = from_yaml.state_dict(), keyword.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    img = torch.randn(1, chans, patch * 3, patch * 5)
    with torch.no_grad():
        torch.testing.assert_close(from_yaml(img), keyword(img), rtol=0, atol=0)


def test_naflex_only_arguments_reach_the_naflex_model(tmp_path):
    """``enable_patch_interpolator=True`` (what timm's train.py ``--naflex-patch-sizes`` needs, through
    ``--model-kwargs``) goes to the NaFlexVit, not to the classic ViT it is converted from (which refuses it); at the
    variant's own patch the model is the plain conversion's."""
    plain, _ = variant("vit_patch8_gray", tmp_path)
    naflex = timm.create_model(
        plain.pretrained_cfg["architecture"], pretrained=True, use_naflex=True, enable_patch_interpolator=True
    ).eval()
    assert naflex.embeds.enable_patch_interpolator
    reference = timm.create_model(plain.pretrained_cfg["architecture"], pretrained=True, use_naflex=True).eval()
    img = torch.randn(1, 1, 8 * 3, 8 * 5)
    with torch.no_grad():
        torch.testing.assert_close(naflex(img), reference(img), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["vit_patch8_gray", "eva02"])
def test_features_only_is_timms_wrapper_of_the_naflexvit_with_the_dynamic_features(case, tmp_path):
    """``features_only=True`` with ``use_naflex=True``: timm's feature wrapper of its NaFlexVit (the getter, pruned
    past the last index, as for timm's own), holding the converted weights: its maps equal the dynamic variant's
    ``features_only`` maps at any size, and what the wrapper pruned is reported so."""
    _, args, _, _, patch, chans = CASES[case]
    name = register_case(case, tmp_path)
    dynamic = timm.create_model(name, pretrained=True, features_only=True, out_indices=(0,)).eval()
    naflex = timm.create_model(name, pretrained=True, use_naflex=True, features_only=True, out_indices=(0,)).eval()
    assert isinstance(naflex.model, naflexvit.NaFlexVit) and len(naflex.model.blocks) == 1
    assert naflex.pretrained_cfg == dynamic.pretrained_cfg
    report = timm_anysize.adaptation_report(naflex)
    assert report.dropped["blocks.1.mlp.fc2.weight"] == "pruned by features_only"
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for hw in [(patch * 4, patch * 4), (patch * 3, patch * 6), (patch * 7, patch * 2)]:
            x = torch.randn(1, chans, *hw, generator=gen)
            (got,), (want,) = naflex(x), dynamic(x)
            assert got.shape == want.shape == (1, args["embed_dim"], hw[0] // patch, hw[1] // patch)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_naflexvit_variant_with_use_naflex_keeps_its_other_arguments():
    """A NaFlexViT variant is one already: ``use_naflex=True`` changes nothing, ``features_only`` still wraps it,
    and NaFlexVit's own arguments (train.py's ``--model-kwargs use_naflex=True enable_patch_interpolator=True``)
    reach it."""
    name = timm_anysize.register_variant(
        unique_name("nfv"), base="naflexvit_base_patch16_gap", model_args=TINY_VIT, img_size=64
    )
    wrapper = timm.create_model(name, use_naflex=True, features_only=True, out_indices=(0,))
    assert isinstance(wrapper.model, naflexvit.NaFlexVit)
    (out,) = wrapper(torch.randn(1, 3, 64, 48))
    assert out.shape == (1, 64, 4, 3)
    for flag in (False, True):
        model = timm.create_model(name, use_naflex=True, enable_patch_interpolator=flag)
        assert isinstance(model, naflexvit.NaFlexVit) and model.embeds.enable_patch_interpolator is flag
