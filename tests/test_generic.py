"""The generic path: any timm architecture without a family row (most CNNs) is adapted with every tensor accounted
for: same-shape tensors copied, the first layer(s) named by the pretrained cfg's ``first_conv`` channel-adapted,
the ``classifier`` replaced on a new ``num_classes``, and any other tensor the geometry reshapes refused by name."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file

import timm_anysize
from conftest import run_python, unique_name
from timm_anysize.core.spec import parse_variant
from timm_anysize.families import family_of
from timm_anysize.plan import make_plan

SIZE = 64
# (example, model args): CNNs with BatchNorm (ResNet, EfficientNet), LayerNorm (ConvNeXt), and a stem of two
# parallel first convolutions (RepVGG: first_conv names both).
CNNS = {
    "test_resnet": {},
    "test_convnext": {},
    "test_efficientnet": {},
    "repvgg_a0": {},
}
CHANGES = {
    "img_larger": dict(img_size=SIZE + 32),
    "img_non_square": dict(img_size=[SIZE + 32, SIZE]),
    "in_chans_1": dict(in_chans=1),
    "in_chans_4": dict(in_chans=4),
    "new_head": dict(num_classes=7, in_chans=2, img_size=48),
}


@pytest.fixture
def cnn_checkpoint(make_checkpoint):
    def make(arch):
        return make_checkpoint(arch, **CNNS[arch])

    return make


def _variant(arch: str, path, **spec) -> str:
    return timm_anysize.register_variant(
        unique_name("g"), base=arch, model_args=CNNS[arch], pretrained={"file": str(path), "img_size": SIZE}, **spec
    )


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("arch", list(CNNS))
def test_generic_cell(arch, change, cnn_checkpoint):
    path, _ = cnn_checkpoint(arch)
    name = _variant(arch, path, **CHANGES[change])
    torch.manual_seed(0)
    fresh = timm.create_model(name).state_dict()
    model = timm.create_model(name, pretrained=True).eval()
    assert family_of(model) is None and model._anysize_plan.family.generic
    loaded, report = model.state_dict(), timm_anysize.adaptation_report(model)
    checkpoint = load_file(path)
    assert set(report.entries) == set(loaded)  # every tensor, BatchNorm statistics included
    assert any(k.endswith("running_var") for k in loaded) is (arch != "test_convnext")
    first = model.pretrained_cfg["first_conv"]
    first_keys = {f"{n}.weight" for n in ((first,) if isinstance(first, str) else first)}
    for key, entry in report.entries.items():
        if entry.action == "copied":
            assert torch.equal(loaded[key], checkpoint[key]), key
        elif entry.action == "adapted":
            assert key in first_keys and not torch.equal(loaded[key], fresh[key]), key
        else:
            assert entry.action == "initialized" and change == "new_head", key
    adapted = {k for k, e in report.entries.items() if e.action == "adapted"}
    assert adapted == (first_keys if "in_chans" in CHANGES[change] else set())
    c, h, w = model.pretrained_cfg["input_size"]
    assert model.pretrained_cfg["fixed_input_size"] is False and timm_anysize.is_dynamic(model)
    with torch.no_grad():
        for hw in [(h, w), (h + 32, w), (h, w + 45)]:
            out = model(torch.randn(2, c, *hw))
            assert out.shape == (2, model.num_classes) and torch.isfinite(out).all(), hw


@pytest.mark.parametrize("arch", list(CNNS))
def test_same_geometry_is_bit_identical(arch, cnn_checkpoint):
    path, base = cnn_checkpoint(arch)
    model = timm.create_model(_variant(arch, path, img_size=SIZE), pretrained=True).eval()
    assert timm_anysize.adaptation_report(model).non_copied() == []
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(model(x), base.eval()(x))


@pytest.mark.parametrize("arch", list(CNNS))
def test_one_channel_on_gray_equals_base_on_gray_rgb(arch, cnn_checkpoint):
    path, base = cnn_checkpoint(arch)
    model = timm.create_model(_variant(arch, path, in_chans=1), pretrained=True).eval()
    gray = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(gray), base.eval()(gray.expand(-1, 3, -1, -1)), atol=2e-5, rtol=1e-4)


def test_patch_size_is_refused_at_validation_with_the_reason():
    with pytest.raises(
        timm_anysize.SpecError,
        match=r"the resnet family cannot take patch_larger: ResNet has no patch "
        r"kernel .*its first layer conv1\.0",
    ):
        make_plan(parse_variant("x", {"base": "test_resnet", "patch_size": 8}))


def test_geometry_bound_tensor_without_a_row_is_named_and_channels_still_adapt(make_checkpoint):
    """A user's own timm architecture (tests/anysize_test_models.py) whose position embedding is sized by the grid
    has no row: another img_size is refused naming it, before any weights are read; in_chans still changes (only
    the first conv differs)."""
    import anysize_test_models  # noqa: F401  (registers anysize_posgrid with timm)

    with pytest.raises(
        timm_anysize.AdaptationError,
        match=r"anysize_posgrid \(PosGridNet, no family row\) has "
        r"tensors whose shape depends .*pos_embed: \(1, 8, 16, "
        r"16\) -> \(1, 8, 24, 24\)",
    ):
        make_plan(parse_variant("x", {"base": "anysize_posgrid", "img_size": 96}))
    path, base = make_checkpoint("anysize_posgrid")
    name = timm_anysize.register_variant(
        unique_name("g"), base="anysize_posgrid", in_chans=1, pretrained={"file": str(path)}
    )
    model = timm.create_model(name, pretrained=True).eval()
    assert [e.key for e in timm_anysize.adaptation_report(model).non_copied()] == ["stem.weight"]
    gray = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(gray), base.eval()(gray.expand(-1, 3, -1, -1)), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["test_resnet", "test_convnext"])
def test_export_reloads_in_plain_timm(arch, cnn_checkpoint, tmp_path):
    path, _ = cnn_checkpoint(arch)
    model = timm.create_model(_variant(arch, path, img_size=[96, 64], in_chans=1, num_classes=3), pretrained=True)
    model.eval()
    out = timm_anysize.export(model, tmp_path / "export")
    inputs = {"own": torch.randn(2, 1, 96, 64), "other": torch.randn(2, 1, 50, 77)}
    with torch.no_grad():
        expected = {k: model(x) for k, x in inputs.items()}
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "io.pt")
    text = run_python(f"""
        import torch, timm
        m = timm.create_model("local-dir:{out}", pretrained=True).eval()
        io = torch.load("{tmp_path / "io.pt"}", weights_only=True)
        cfg = timm.data.resolve_data_config({{}}, model=m)
        with torch.no_grad():
            same = all(torch.equal(m(io["inputs"][k]), io["expected"][k]) for k in io["inputs"])
        print(type(m).__module__, same, cfg["input_size"], len(cfg["mean"]))
    """)
    assert text.split() == [f"timm.models.{arch.split('_')[1]}", "True", "(1,", "96,", "64)", "1"]


@pytest.mark.parametrize("name, base", [("resnet18_gray", "resnet18"), ("convnext_atto_gray_160", "convnext_atto")])
def test_shipped_cnn_variants(name, base, make_checkpoint, tmp_path):
    """configs/cnn.yaml: Hub weights declared from the base tag; the data cfg and transforms give one channel at
    the variant's size; loaded from a checkpoint of the base's shape (pretrained_cfg_overlay, no network), the
    export reloads in plain timm with the same outputs."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.hf_hub_id == f"timm/{timm_anysize.get_variant(name).base}" and cfg.input_size[0] == 1
    path, _ = make_checkpoint(base)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    data = resolve_data_config({}, model=model)
    assert data["input_size"] == cfg.input_size and len(data["mean"]) == len(data["std"]) == 1
    x = create_transform(**data)(Image.new("L", (300, 200), 128)).unsqueeze(0)
    assert x.shape == (1, *cfg.input_size)
    out = timm_anysize.export(model, tmp_path / "export")
    with torch.no_grad():
        expected = model(x)
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    text = run_python(f"""
        import torch, timm
        m = timm.create_model("local-dir:{out}", pretrained=True).eval()
        io = torch.load("{tmp_path / "io.pt"}", weights_only=True)
        with torch.no_grad():
            print(torch.equal(m(io["x"]), io["expected"]))
    """)
    assert text.split() == ["True"]


def test_survey_file_covers_every_timm_module():
    """timm_anysize/survey.json (rendered into docs/families.md) was computed with the installed timm for every
    module it has; `timm-anysize families --refresh` recomputes it."""
    from timm_anysize.apps.survey import load_survey

    survey = load_survey()
    assert survey["timm_version"] == timm.__version__
    # every module of timm's own (not timm_anysize.variants, where the variants register, nor the test architectures
    # tests register, such as tests/anysize_test_models.py's: their entrypoints live outside timm)
    own = [
        m
        for m in timm.list_modules()
        if timm.models.model_entrypoint(timm.list_models(module=m)[0]).__module__.startswith("timm.")
    ]
    assert sorted(survey["modules"]) == sorted(own)
    assert all(r["models"] >= 1 and r["example"] in timm.list_models(module=m) for m, r in survey["modules"].items())


SURVEY_SAMPLE = ["resnet", "convnext", "mlp_mixer", "visformer", "vision_transformer"]  # not family rows: timm modules


@pytest.mark.parametrize("module", SURVEY_SAMPLE)
def test_survey_sample_recomputes_to_the_stored_result(module):
    from timm_anysize.apps.survey import load_survey, survey_module

    assert survey_module(module) == load_survey()["modules"][module]
