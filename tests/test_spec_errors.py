"""Bad input: each error names the YAML file, the variant and the key, says what is wrong and how to fix it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import timm
import torch

import timm_anysize
from conftest import unique_name
from timm_anysize.yaml_config import load_yaml_specs


def write_yaml(tmp_path: Path, body: str, name: str = "v.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def one_variant(tmp_path: Path, name: str, **lines: str) -> Path:
    body = "variants:\n  " + name + ":\n" + "".join(f"    {k}: {v}\n" for k, v in lines.items())
    return write_yaml(tmp_path, body)


@pytest.mark.parametrize(
    "lines, key, fragments",
    [
        ({"base": "test_vit", "img_sise": "64"}, "img_sise", ["unknown key", "did you mean 'img_size'"]),
        (
            {"base": "test_vit", "img_size": "64", "patch_size": "5"},
            "",
            ["patch_size [5, 5] must divide img_size [64, 64]"],
        ),
        (
            {"base": "test_vit", "img_size": "[48, 64]", "patch_size": "[16, 10]"},
            "",
            ["width 64 is not a multiple of 10"],
        ),
        ({"base": "test_vit", "img_size": "-3"}, "img_size", ["between 1 and 1000000", "-3"]),
        ({"base": "test_vit", "img_size": "'64'"}, "img_size", ["'64'"]),
        ({"base": "test_vit", "in_chans": "0"}, "in_chans", ["greater than or equal to 1", "0"]),
        ({"base": "test_vit", "pretrained": "{fiel: x.pth}"}, "pretrained.fiel", ["did you mean 'file'"]),
        ({"base": "test_vit", "pretrained": "{file: a.pth, hf_hub_id: x/y}"}, "pretrained", ["one weight location"]),
        (
            {"base": "test_vit", "adapt": "{patch_embed: {method: lanczos}}"},
            "adapt.patch_embed.method",
            ["'pi'", "'interpolate'", "lanczos"],
        ),
        (
            {"base": "test_vit", "adapt": "{pos_embed: {interpolation: nearest, antialias: true}}"},
            "adapt.pos_embed",
            ["antialias is only supported"],
        ),
        ({"base": "test_vit", "model_args": "{img_size: 32}"}, "model_args", ["at the variant's top level"]),
        ({"img_size": "64"}, "base", ["Field required"]),
    ],
)
def test_spec_errors_name_file_variant_key(tmp_path, lines, key, fragments):
    path = one_variant(tmp_path, "bad_variant", **lines)
    with pytest.raises(timm_anysize.SpecError) as err:
        timm_anysize.register_yaml(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: bad_variant{'.' + key if key else ''}:"), msg
    for fragment in fragments:
        assert fragment in msg, msg
    assert "bad_variant" not in timm.list_models("bad_variant*")


def test_unknown_base_suggests_close_matches(tmp_path):
    path = one_variant(tmp_path, unique_name(), base="vit_tiny_patch16_244")
    with pytest.raises(
        timm_anysize.SpecError,
        match=r"\.base: unknown timm model 'vit_tiny_patch16_244'; close matches: .*vit_tiny_patch16_224",
    ):
        timm_anysize.register_yaml(path)


def test_unknown_base_tag_lists_tags(tmp_path):
    path = one_variant(tmp_path, unique_name(), base="vit_tiny_patch16_224.nope")
    with pytest.raises(timm_anysize.SpecError, match=r"no pretrained tag 'nope'.*augreg_in21k_ft_in1k"):
        timm_anysize.register_yaml(path)


def test_patch_must_divide_default_img_size(tmp_path):
    name = unique_name()
    path = one_variant(tmp_path, name, base="test_vit", patch_size="7")  # base is 160 px
    with pytest.raises(
        timm_anysize.SpecError,
        match=rf"{name}\.img_size: the target patch size \[7, 7\] must divide the target img_size \[160, 160\]",
    ):
        timm_anysize.register_yaml(path)


def test_missing_weight_file_names_the_resolved_path(tmp_path):
    name = unique_name()
    path = one_variant(tmp_path, name, base="test_vit", pretrained="{file: weights/missing.pth}")
    timm_anysize.register_yaml(path)
    resolved = tmp_path / "weights" / "missing.pth"
    with pytest.raises(timm_anysize.WeightsError, match=rf"{resolved}: weight file not found"):
        timm.create_model(name, pretrained=True)


def test_relative_weight_path_resolves_against_the_yaml(tmp_path, make_checkpoint):
    ckpt, _ = make_checkpoint("test_vit")
    (tmp_path / "sub").mkdir()
    name = unique_name()
    path = write_yaml(
        tmp_path / "sub", f"variants:\n  {name}:\n    base: test_vit\n    pretrained: {{file: ../{ckpt.name}}}\n"
    )
    timm_anysize.register_yaml(path)
    assert timm_anysize.get_variant(name).pretrained.file == ckpt.resolve()
    timm.create_model(name, pretrained=True)


def test_name_colliding_with_timm_builtin(tmp_path):
    path = one_variant(tmp_path, "vit_tiny_patch16_224", base="test_vit")
    with pytest.raises(
        timm_anysize.RegistrationError, match=r"v.yaml: vit_tiny_patch16_224: the name collides with timm's built-in"
    ):
        timm_anysize.register_yaml(path)


def test_same_name_twice_different_spec_and_idempotent_same_spec(tmp_path):
    name = unique_name()
    a = one_variant(tmp_path, name, base="test_vit", img_size="64")
    assert timm_anysize.register_yaml(a) == [name]
    assert timm_anysize.register_yaml(a) == [name]  # identical: a no-op
    b = write_yaml(tmp_path, f"variants:\n  {name}:\n    base: test_vit\n    img_size: 96\n", "b.yaml")
    with pytest.raises(
        timm_anysize.RegistrationError,
        match=rf"b.yaml: {name}: the name is already registered with a different spec \(from .*v.yaml\)",
    ):
        timm_anysize.register_yaml(b)
    assert timm.create_model(name).pretrained_cfg["input_size"] == (3, 64, 64)


def test_a_bad_variant_registers_nothing_from_the_file(tmp_path):
    good, bad = unique_name(), unique_name()
    path = write_yaml(
        tmp_path,
        f"""
        variants:
          {good}:
            base: test_vit
          {bad}:
            base: test_vit
            patch_size: 7
    """,
    )
    with pytest.raises(timm_anysize.SpecError):
        timm_anysize.register_yaml(path)
    assert not timm.is_model(good) and not timm.is_model(bad)


def test_yaml_level_errors(tmp_path):
    dup = write_yaml(tmp_path, "variants:\n  a_x:\n    base: test_vit\n  a_x:\n    base: test_vit\n", "dup.yaml")
    with pytest.raises(timm_anysize.SpecError, match=r"dup.yaml: not valid YAML: .*duplicate key 'a_x'"):
        load_yaml_specs(dup)
    top = write_yaml(tmp_path, "variant:\n  a: {}\n", "top.yaml")
    with pytest.raises(
        timm_anysize.SpecError, match=r"top.yaml: unknown top-level key 'variant'; did you mean 'variants'"
    ):
        load_yaml_specs(top)
    tag = write_yaml(tmp_path, "variants: !!python/object/apply:os.system ['echo pwned']\n", "tag.yaml")
    with pytest.raises(timm_anysize.SpecError, match=r"tag.yaml: not valid YAML"):
        load_yaml_specs(tag)
    with pytest.raises(timm_anysize.SpecError, match=r"nope.yaml: no such file"):
        load_yaml_specs(tmp_path / "nope.yaml")
    name = write_yaml(tmp_path, "variants:\n  Bad.Name:\n    base: test_vit\n", "name.yaml")
    with pytest.raises(timm_anysize.SpecError, match=r"name.yaml: Bad.Name.name: String should match pattern"):
        load_yaml_specs(name)


def test_yaml_anchors_and_merge_keys_work(tmp_path):
    a, b = unique_name(), unique_name()
    path = write_yaml(
        tmp_path,
        f"""
        variants:
          {a}: &common
            base: test_vit
            img_size: 64
          {b}:
            <<: *common
            in_chans: 1
            img_size: 32
    """,
    )
    specs = load_yaml_specs(path)
    assert [s.img_size for s in specs] == [(64, 64), (32, 32)] and specs[1].in_chans == 1


def test_geometry_bound_tensors_without_a_row_are_rejected_before_weights(tmp_path):
    """An architecture without a family row is adapted generically; a tensor the geometry reshapes is named."""
    import anysize_test_models  # noqa: F401  (a user's own timm architecture, registered with timm)

    path = one_variant(tmp_path, unique_name(), base="anysize_posgrid", img_size="[64, 96]")
    with pytest.raises(
        timm_anysize.AdaptationError,
        match=r"v.yaml: .*anysize_posgrid \(PosGridNet, no family row\) has tensors whose shape "
        r"depends on the geometry .*pos_embed: \(1, 8, 16, 16\) -> \(1, 8, 16, 24\)",
    ):
        timm_anysize.register_yaml(path)


@pytest.mark.parametrize(
    "base, img_size, fragment",
    [
        ("efficientformer_l1", "128", r"last stage's attention for a 7 x 7 grid"),
        ("convit_tiny", "[224, 160]", r"GPSA relative positions for a square patch grid"),
    ],
)
def test_sizes_only_the_dynamic_path_runs_need_dynamic(tmp_path, base, img_size, fragment):
    """timm's own model at these sizes fails in its forward: ``dynamic: false`` is refused at validation, and the
    same spec with the dynamic path (the default) runs."""
    name = unique_name()
    path = one_variant(tmp_path, name, base=base, img_size=img_size, dynamic="false")
    with pytest.raises(
        timm_anysize.SpecError,
        match=rf"v.yaml: {name}.dynamic: false builds timm's own .* at img_size .*{fragment}.*"
        r"leave dynamic on",
    ):
        timm_anysize.register_yaml(path)
    ok = one_variant(tmp_path, name, base=base, img_size=img_size)
    timm_anysize.register_yaml(ok)
    size = timm.data.resolve_data_config({}, model=timm.create_model(name))["input_size"][1:]
    assert timm.create_model(name).eval()(torch.randn(1, 3, *size)).shape == (1, 1000)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"not a checkpoint at all", "cannot be read as a PyTorch state dict"),
        (b"\x80\x04\x95\x00", "cannot be read as a PyTorch state dict"),
    ],
)
def test_corrupt_pth_names_the_file(tmp_path, content, fragment):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)
    name = timm_anysize.register_variant(unique_name(), base="test_vit", pretrained={"file": str(bad)})
    with pytest.raises(timm_anysize.WeightsError, match=rf"{bad}: {fragment}"):
        timm.create_model(name, pretrained=True)


def test_truncated_safetensors_names_the_file(tmp_path, make_checkpoint):
    ckpt, _ = make_checkpoint("test_vit")
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(ckpt.read_bytes()[:5000])
    name = timm_anysize.register_variant(unique_name(), base="test_vit", pretrained={"file": str(bad)})
    with pytest.raises(timm_anysize.WeightsError, match=rf"{bad}: not a readable safetensors file"):
        timm.create_model(name, pretrained=True)


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    import pickle

    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    bad = tmp_path / "evil.pth"
    bad.write_bytes(pickle.dumps({"pos_embed": Payload()}))
    name = timm_anysize.register_variant(unique_name(), base="test_vit", pretrained={"file": str(bad)})
    with pytest.raises(timm_anysize.WeightsError, match=r"evil.pth: .*weights_only=True.*never unpickles code"):
        timm.create_model(name, pretrained=True)
    assert not sentinel.exists()


def test_no_weight_source(tmp_path):
    name = timm_anysize.register_variant(unique_name(), base="vit_base_patch16_reg4_gap_256", img_size=64)
    assert not timm.is_model_pretrained(name)
    with pytest.raises(timm_anysize.WeightsError, match=rf"{name}.pretrained: no weight source"):
        timm.create_model(name, pretrained=True)


def test_offline_hub_source_gives_a_clear_error(tmp_path):
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # set by conftest before the first import
    name = timm_anysize.register_variant(unique_name(), base="test_vit", pretrained={"hf_hub_id": "someone/not-cached"})
    with pytest.raises(
        timm_anysize.WeightsError, match=r"hf_hub_id 'someone/not-cached'.*not in the cache.*pretrained.file"
    ):
        timm.create_model(name, pretrained=True, cache_dir=str(tmp_path / "hub"))
