"""transformers checkpoints (save_pretrained folders) load into any-size timm variants with transformers' numbers."""

from __future__ import annotations

import pytest
import timm
import torch

transformers = pytest.importorskip("transformers")

from script_fx import fx_model  # noqa: E402
from test_origins_torchvision import randomize, rel  # noqa: E402

import timm_anysize  # noqa: E402
from conftest import unique_name  # noqa: E402
from timm_anysize.core.errors import WeightsError  # noqa: E402

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
VIT_ARGS = dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0)


def saved(model, tmp_path):
    randomize(model)
    model.save_pretrained(tmp_path)
    return model


def variant(path, img_size, base, model_args=VIT_ARGS, num_classes=10, **kw):
    name = unique_name("hf")
    pretrained = {"file": str(path), "img_size": 32, "patch_size": 8, "num_classes": 10, **kw.pop("pretrained", {})}
    timm_anysize.register_variant(
        name,
        base=base,
        img_size=img_size,
        patch_size=pretrained["patch_size"],
        num_classes=num_classes,
        model_args=dict(model_args),
        pretrained=pretrained,
        **kw,
    )
    return name


def hf_logits(model, x, **kw):
    with torch.no_grad():
        return model(pixel_values=x, **kw).logits


SIZES = [(48, 48), (24, 24), (24, 48)]


def test_vit_source_geometry_and_compat(tmp_path):
    src = saved(
        transformers.ViTForImageClassification(
            transformers.ViTConfig(**SMALL, intermediate_size=128, num_labels=10, layer_norm_eps=1e-6)
        ),
        tmp_path,
    ).eval()
    compat = {"pos_embed": {"compat": "transformers"}}
    m = timm.create_model(variant(tmp_path, 32, "vit_base_patch16_224", adapt=compat), pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel(m(x), hf_logits(src, x)) <= 1e-5
    report = timm_anysize.adaptation_report(m)
    assert report.origin["layout"] == "transformers.vit" and report.origin["notes"] == []
    assert "vit.encoder.layer.0.attention.attention.key.weight" in report.entries["blocks.0.attn.qkv.weight"].detail
    scripted, traced = torch.jit.script(m), fx_model(m)
    for size in SIZES:
        y = torch.randn(1, 3, *size)
        built = timm.create_model(
            variant(tmp_path, size, "vit_base_patch16_224", adapt=compat, dynamic=False), pretrained=True
        ).eval()
        with torch.no_grad():
            want = hf_logits(src, y, interpolate_pos_encoding=True)
            assert rel(built(y), want) <= 1e-5, size
            assert rel(m(y), want) <= 1e-5, size  # the run-time dynamic forward, same preset
            # TorchScript and FX run the same preset
            assert torch.equal(scripted(y), m(y)) and torch.equal(next(iter(traced(y).values())), m(y)), size


def test_vit_eps_difference_is_stated(tmp_path):
    src = saved(
        transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, intermediate_size=128, num_labels=10)),
        tmp_path,
    ).eval()
    m = timm.create_model(variant(tmp_path, 32, "vit_base_patch16_224"), pretrained=True).eval()
    note = timm_anysize.adaptation_report(m).origin["notes"][0]
    assert "eps 1e-12 in the origin, 1e-06 in timm" in note
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel(m(x), hf_logits(src, x)) <= 1e-4


def test_vit_gelu_approximation_needs_model_args(tmp_path):
    saved(
        transformers.ViTForImageClassification(
            transformers.ViTConfig(**SMALL, intermediate_size=128, num_labels=10, hidden_act="gelu_pytorch_tanh")
        ),
        tmp_path,
    )
    with pytest.raises(WeightsError, match="add `act_layer: gelu_tanh`"):
        timm.create_model(variant(tmp_path, 32, "vit_base_patch16_224"), pretrained=True)
    m = timm.create_model(
        variant(tmp_path, 32, "vit_base_patch16_224", model_args={**VIT_ARGS, "act_layer": "gelu_tanh"}),
        pretrained=True,
    )
    assert timm_anysize.adaptation_report(m).origin["layout"] == "transformers.vit"


def test_config_geometry_is_checked(tmp_path):
    saved(
        transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, intermediate_size=128, num_labels=10)),
        tmp_path,
    )
    with pytest.raises(WeightsError, match=r"config.json .* says image_size \[32, 32\].*pretrained.img_size"):
        timm.create_model(variant(tmp_path, 32, "vit_base_patch16_224", pretrained={"img_size": 40}), pretrained=True)


def test_config_fills_the_source_geometry(tmp_path):
    """No pretrained geometry in the spec: config.json's image_size / patch_size / num_channels are the source's."""
    src = saved(
        transformers.ViTForImageClassification(
            transformers.ViTConfig(
                **{**SMALL, "image_size": 40}, num_channels=2, intermediate_size=128, num_labels=10, layer_norm_eps=1e-6
            )
        ),
        tmp_path,
    ).eval()
    name = unique_name("hf")
    timm_anysize.register_variant(
        name,
        base="vit_base_patch16_224",
        img_size=[40, 64],
        patch_size=8,
        in_chans=2,
        num_classes=10,
        model_args=VIT_ARGS,
        dynamic=False,
        adapt={"pos_embed": {"compat": "transformers"}},
        pretrained={"file": str(tmp_path), "num_classes": 10},
    )
    m = timm.create_model(name, pretrained=True).eval()
    plan = m._anysize_plan
    assert (plan.source.img_size, plan.source.patch_size, plan.source.in_chans) == ((40, 40), (8, 8), 2)
    y = torch.randn(2, 2, 40, 64)
    with torch.no_grad():
        assert rel(m(y), hf_logits(src, y, interpolate_pos_encoding=True)) <= 1e-5


def test_config_from_a_hub_repo_fills_the_source_geometry(tmp_path):
    """The same through the real huggingface_hub client, from a save_pretrained folder on a Hub stand-in."""
    from hub_standin import HubStandIn

    from conftest import run_python

    src = saved(
        transformers.ViTForImageClassification(
            transformers.ViTConfig(
                **{**SMALL, "image_size": 40}, intermediate_size=128, num_labels=10, layer_norm_eps=1e-6
            )
        ),
        tmp_path / "folder",
    ).eval()
    y = torch.randn(2, 3, 56, 40)
    torch.save({"y": y, "want": hf_logits(src, y, interpolate_pos_encoding=True)}, tmp_path / "io.pt")
    code = f"""
        import timm, torch, timm_anysize
        name = timm_anysize.register_variant(
            "hub_vit", base="vit_base_patch16_224", img_size=[56, 40], patch_size=8, num_classes=10,
            model_args={VIT_ARGS!r}, dynamic=False, adapt={{"pos_embed": {{"compat": "transformers"}}}},
            pretrained={{"hf_hub_id": "org/hf-vit", "num_classes": 10}})
        m = timm.create_model(name, pretrained=True).eval()
        io = torch.load("{tmp_path / "io.pt"}", weights_only=True)
        with torch.no_grad():
            err = ((m(io["y"]) - io["want"]).norm() / io["want"].norm()).item()
        print(m._anysize_plan.source.img_size, timm_anysize.adaptation_report(m).origin["layout"], err < 1e-5)
    """
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    with HubStandIn() as hub:
        files = {p.name: p.read_bytes() for p in (tmp_path / "folder").iterdir()}
        hub.state.repos["org/hf-vit"] = {"private": False, "files": files, "commits": []}
        out = run_python(code, {**env, "HF_ENDPOINT": hub.url})
        fetched = [path for method, path, _ in hub.state.requests if method == "GET"]
        assert not hub.state.unknown, hub.state.unknown
    assert out.split() == ["(40,", "40)", "transformers.vit", "True"], out
    assert any(p.endswith("/config.json") for p in fetched), fetched
    # offline, the config comes from the cache huggingface_hub filled, next to the weights
    assert run_python(code, {**env, "HF_HUB_OFFLINE": "1"}) == out


def test_deit_with_teacher(tmp_path):
    src = saved(
        transformers.DeiTForImageClassificationWithTeacher(
            transformers.DeiTConfig(**SMALL, intermediate_size=128, num_labels=10, layer_norm_eps=1e-6)
        ),
        tmp_path,
    ).eval()
    compat = {"pos_embed": {"compat": "transformers"}}
    m = timm.create_model(
        variant(tmp_path, 32, "deit_base_distilled_patch16_224", adapt=compat), pretrained=True
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel(m(x), hf_logits(src, x)) <= 1e-5
        y = torch.randn(1, 3, 48, 24)
        assert rel(m(y), hf_logits(src, y, interpolate_pos_encoding=True)) <= 1e-5


@pytest.mark.parametrize("registers", [False, True], ids=["dinov2", "dinov2_reg"])
def test_dinov2(tmp_path, registers):
    cfg = dict(**SMALL, mlp_ratio=2, layerscale_value=0.5)
    if registers:
        src = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(**cfg, num_register_tokens=4)
        )
        base, compat = "vit_small_patch14_reg4_dinov2", "timm"  # transformers antialiases here
    else:
        src = transformers.Dinov2Model(transformers.Dinov2Config(**cfg))
        base, compat = "vit_small_patch14_dinov2", "transformers"
    saved(src, tmp_path).eval()
    m = timm.create_model(
        variant(
            tmp_path, 32, base, num_classes=0, adapt={"pos_embed": {"compat": compat}}, pretrained={"num_classes": 0}
        ),
        pretrained=True,
    ).eval()
    assert timm_anysize.adaptation_report(m).origin["layout"] == "transformers.dinov2"
    for size in [(32, 32), *SIZES]:
        y = torch.randn(1, 3, *size)
        with torch.no_grad():
            assert rel(m(y), src(pixel_values=y).pooler_output) <= 1e-5, size


def test_beit(tmp_path):
    src = saved(
        transformers.BeitForImageClassification(
            transformers.BeitConfig(
                **SMALL,
                intermediate_size=128,
                num_labels=10,
                use_relative_position_bias=True,
                use_mean_pooling=True,
                layer_scale_init_value=0.1,
                layer_norm_eps=1e-6,
            )
        ),
        tmp_path,
    ).eval()
    compat = {"pos_embed": {"compat": "transformers"}}
    m = timm.create_model(variant(tmp_path, 32, "beit_base_patch16_224", adapt=compat), pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel(m(x), hf_logits(src, x)) <= 1e-5
    # other sizes: transformers resizes BEiT's bias tables bilinearly, timm over a geometric grid; the preset
    # reproduces transformers at load time, in the run-time forward, under TorchScript and FX
    scripted, traced = torch.jit.script(m), fx_model(m)
    for size in SIZES:
        y = torch.randn(1, 3, *size)
        built = timm.create_model(
            variant(tmp_path, size, "beit_base_patch16_224", adapt=compat, dynamic=False), pretrained=True
        ).eval()
        assert (
            "compat transformers: bilinear"
            in timm_anysize.adaptation_report(built).entries["blocks.0.attn.relative_position_bias_table"].detail
        )
        with torch.no_grad():
            want = hf_logits(src, y, interpolate_pos_encoding=True)
            assert rel(built(y), want) <= 1e-5, size
            assert rel(m(y), want) <= 1e-5, size
            assert torch.equal(scripted(y), m(y)) and torch.equal(next(iter(traced(y).values())), m(y)), size
        timm_default = timm.create_model(
            variant(tmp_path, size, "beit_base_patch16_224", dynamic=False), pretrained=True
        ).eval()
        with torch.no_grad():
            assert rel(timm_default(y), want) > 1e-4, size  # the preset is what makes the difference


def test_swin_any_size(tmp_path):
    src = saved(
        transformers.SwinForImageClassification(
            transformers.SwinConfig(
                image_size=224,
                patch_size=4,
                embed_dim=32,
                depths=[1, 2, 1, 1],
                num_heads=[2, 2, 4, 4],
                window_size=7,
                num_labels=10,
            )
        ),
        tmp_path,
    ).eval()
    args = dict(embed_dim=32, depths=(1, 2, 1, 1), num_heads=(2, 2, 4, 4), window_size=7)
    for size in [(224, 224), (224, 448)]:
        m = timm.create_model(
            variant(
                tmp_path,
                size,
                "swin_tiny_patch4_window7_224",
                model_args=args,
                dynamic=False,
                pretrained={"img_size": 224, "patch_size": 4},
            ),
            pretrained=True,
        ).eval()
        y = torch.randn(1, 3, *size)
        with torch.no_grad():
            assert rel(m(y), hf_logits(src, y)) <= 1e-5, size
