"""One pass per ``timm.create_model`` (issue 29): one plan, the source model built at most once (on meta), one real
model -- ``features_only`` included, whose wrapper is timm's, around the model that was loaded.

Model constructions are counted at timm's registry: the variants here are built from ``anysize_count_vit``, a timm
model registered by this module whose entrypoint records each call (the device it builds on, its ``img_size``,
``features_only``) and then builds timm's ``test_vit``. A meta build has the meta device as its default device.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from load_memory_child import run_child
from safetensors.torch import save_file
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

import timm_anysize
from conftest import unique_name

BASE = "anysize_count_vit"
BUILDS: list[dict] = []  # one entry per call of the entrypoint: device, img_size, features_only

default_cfgs = generate_default_cfgs({f"{BASE}.count": {**timm.get_pretrained_cfg("test_vit").to_dict(), "url": ""}})


@register_model
def anysize_count_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """timm's ``test_vit``, counted."""
    device = torch.empty(0).device.type  # "meta" inside a meta build (torch.device("meta") as the default device)
    BUILDS.append(dict(device=device, img_size=kwargs.get("img_size"), features=bool(kwargs.get("features_only"))))
    return timm.create_model("test_vit", pretrained=pretrained, **kwargs)


def _counts(builds: list[dict]) -> dict[str, int]:
    """Real builds, meta builds of the source (the weights' size: none given, or the config.json's 160), other meta
    builds (the target's, at 64)."""
    real = [b for b in builds if b["device"] != "meta"]
    source = [b for b in builds if b["device"] == "meta" and b["img_size"] in (None, 160, (160, 160))]
    return dict(
        real=len(real),
        real_features=sum(b["features"] for b in real),
        source_meta=len(source),
        other_meta=len(builds) - len(real) - len(source),
    )


def _count(fn) -> tuple[object, dict[str, int]]:
    BUILDS.clear()
    out = fn()
    return out, _counts(BUILDS)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The base's weights: in timm's layout, in OpenCLIP's (``visual.trunk.`` prefix: timm's checkpoint filter reads
    it, with a model at the source geometry), and beside a transformers ``config.json`` (which speaks for them)."""
    folder = tmp_path_factory.mktemp("one_pass")
    torch.manual_seed(0)
    sd = timm.create_model("test_vit").state_dict()
    files = {"timm": folder / "timm.safetensors", "filter": folder / "clip.safetensors"}
    save_file(sd, str(files["timm"]))
    save_file({f"visual.trunk.{k}": v for k, v in sd.items()}, str(files["filter"]))
    (folder / "hf").mkdir()
    files["config"] = folder / "hf" / "model.safetensors"
    save_file(sd, str(files["config"]))
    hf_vit = "vit"  # not family rows: transformers' model_type
    config = {"model_type": hf_vit, "image_size": 160, "patch_size": 16, "num_channels": 3}
    (folder / "hf" / "config.json").write_text(json.dumps(config))
    return files


def _variant(file: Path, **spec) -> str:
    """A variant registered as the shipped ones are (``validate=False``): planned by its first create_model."""
    parsed = timm_anysize.core.spec.parse_variant(
        unique_name(), dict(base=BASE, img_size=64, patch_size=8, pretrained={"file": str(file)}, **spec)
    )
    return timm_anysize.register_specs([parsed], validate=False)[0]


ONE_PASS_COLD = dict(real=1, real_features=0, source_meta=1)
ONE_PASS_WARM = dict(real=1, real_features=0, source_meta=0)


@pytest.mark.parametrize("layout", ["timm", "filter", "config"])
def test_cold_and_warm_plan_cache_build_the_model_once(weights: dict[str, Path], layout: str) -> None:
    name = _variant(weights[layout])
    cold, counts = _count(lambda: timm.create_model(name, pretrained=True))
    assert {k: counts[k] for k in ONE_PASS_COLD} == ONE_PASS_COLD, counts
    warm, counts = _count(lambda: timm.create_model(name, pretrained=True))
    assert {k: counts[k] for k in ONE_PASS_WARM} == ONE_PASS_WARM, counts
    assert counts["other_meta"] == 0, counts  # the plan is the cached one
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(cold.eval()(x), warm.eval()(x))


@pytest.mark.parametrize("layout", ["timm", "filter", "config"])
def test_create_model_kwargs_make_one_plan(weights: dict[str, Path], layout: str) -> None:
    name = _variant(weights[layout])
    for _ in range(2):  # the first planning the variant's own spec too (cold), the second not (warm)
        model, counts = _count(lambda: timm.create_model(name, pretrained=True, num_classes=5))
        assert {k: counts[k] for k in ONE_PASS_COLD} == ONE_PASS_COLD, counts
        assert model.pretrained_cfg["num_classes"] == 5


def test_a_config_json_of_other_weights_makes_one_plan(weights: dict[str, Path]) -> None:
    # The registered spec names timm-layout weights; create_model reads others, whose config.json speaks for them.
    name = _variant(weights["timm"])
    overlay = dict(file=str(weights["config"]))
    model, counts = _count(lambda: timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay))
    assert {k: counts[k] for k in ONE_PASS_COLD} == ONE_PASS_COLD, counts
    assert model._anysize_plan.config["image_size"] == 160


@pytest.mark.parametrize("cache", ["cold", "warm"])
@pytest.mark.parametrize("feature_cls", [None, "fx"])
def test_features_only_wraps_the_loaded_model(weights: dict[str, Path], feature_cls: str | None, cache: str) -> None:
    name = _variant(weights["timm"])
    kwargs = {} if feature_cls is None else {"feature_cls": feature_cls}
    create = lambda: timm.create_model(name, pretrained=True, features_only=True, out_indices=(1, 3), **kwargs)  # noqa: E731
    if cache == "warm":
        timm.create_model(name, pretrained=True)  # plans the variant
    feats, counts = _count(create)
    # timm's own features_only build is the one real build (fx: the full model, traced)
    assert counts["real"] == 1 and counts["source_meta"] == (cache == "cold"), counts
    assert counts["real_features"] == (feature_cls is None), counts
    full = timm.create_model(name, pretrained=True).eval()
    x = torch.randn(2, 3, 96, 48)
    with torch.no_grad():
        got = feats.eval()(x)
        if feature_cls == "fx":  # FX returns the blocks' own outputs (not those of the meta probes of input sizes)
            want = []
            hook = lambda m, a, out: None if out.is_meta else want.append(out)  # noqa: E731
            hooks = [full.blocks[i].register_forward_hook(hook) for i in (1, 3)]
            full(x)
            for h in hooks:
                h.remove()
        else:
            want = full.forward_intermediates(x, indices=(1, 3), intermediates_only=True)
    assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert feats.feature_info.out_indices == (1, 3)
    assert timm_anysize.adaptation_report(feats).dropped["head.weight"] == "pruned by features_only"


@pytest.fixture(scope="module")
def vit_small_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vit_s") / "w.safetensors"
    run_child("make", str(path), "vit_small_patch16_224", "float32")
    return path


def test_features_only_peaks_as_the_plain_load(vit_small_file: Path) -> None:
    geometry = json.dumps(dict(img_size=98, patch_size=14, in_chans=4))
    plain = run_child("load", str(vit_small_file), "vit_small_patch16_224", geometry)
    features = run_child("features", str(vit_small_file), "vit_small_patch16_224", geometry)
    assert plain["model_bytes"] > 80 * 2**20
    ratio = features["added"] / plain["added"]
    assert ratio <= 1.15, f"features_only added {features['added'] / 2**20:.0f} MiB, {ratio:.2f}x the plain load"
