"""The shipped digits base is verified, its training script is deterministic, and the demo's orderings hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import timm_anysize
from conftest import unique_name
from timm_anysize.apps.demo import FLEXI_PATCHES, gap_closed
from timm_anysize.apps.digits import (
    BASE_VARIANT,
    evaluate,
    load_digits_split,
    register_demo_variants,
    render,
    train_digits_base,
)

register_demo_variants()  # the demo's variants: `import timm_anysize` does not register them


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


def test_split_is_fixed_and_stratified(split):
    assert len(split.train_y) == 1437 and len(split.test_y) == 360
    assert torch.bincount(split.test_y).min() >= 35  # every digit in the held-out set
    assert torch.equal(load_digits_split().test_y, split.test_y)


def test_shipped_base_reaches_93_percent_on_held_out(split):
    model = timm.create_model(BASE_VARIANT, pretrained=True)
    report = timm_anysize.adaptation_report(model)
    assert report.non_copied() == []  # loaded at its own geometry: every tensor copied
    assert evaluate(model, render(split.test_x, (32, 32), model), split.test_y) >= 93.0


def test_shipped_weights_are_small():
    path = timm_anysize.get_variant(BASE_VARIANT).pretrained.file
    assert path.is_file() and path.stat().st_size < 2 * 1024 * 1024


def test_one_channel_to_three_gives_identical_predictions(split):
    gray = timm.create_model(BASE_VARIANT, pretrained=True)
    rgb = timm.create_model("vit_digits_patch4_32_rgb", pretrained=True)
    x_gray, x_rgb = render(split.test_x, (32, 32), gray), render(split.test_x, (32, 32), rgb)
    assert x_rgb.shape[1] == 3
    with torch.no_grad():
        torch.testing.assert_close(rgb(x_rgb), gray(x_gray), rtol=1e-5, atol=1e-5)
        assert torch.equal(rgb(x_rgb).argmax(-1), gray(x_gray).argmax(-1))


def test_training_script_smoke_and_determinism(tmp_path):
    acc1, losses1 = train_digits_base(tmp_path / "a.safetensors", epochs=1, progress=False)
    acc2, losses2 = train_digits_base(tmp_path / "b.safetensors", epochs=1, progress=False)
    assert losses1 == losses2 and acc1 == acc2
    a = safetensors.torch.load_file(str(tmp_path / "a.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_demo_quick(tmp_path, capsys):
    from timm_anysize.apps.cli import main

    assert main(["--quiet", "demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "zero-shot" in out and "fine-tuned" in out and "scratch" in out and "img/s" in out
    assert "calibrated (no labels)" in out and "calibrated 2/4/8" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "accuracy_vs_geometry.png").stat().st_size > 10_000
    assert results["base_bit_identical_to_plain_timm"] is True
    rows = {r["label"]: r for r in results["rows"]}
    for r in results["rows"]:
        assert set(r) >= {
            "variant",
            "img_size",
            "patch_size",
            "in_chans",
            "tokens",
            "zero_shot",
            "finetuned",
            "scratch",
            "images_per_s",
            "non_copied",
            "calibrated",
            "calibration",
            "gap_closed",
        }
        assert r["images_per_s"] > 0
        if r["calibrated"] is not None:  # calibration without labels never loses more than half a point
            assert r["calibrated"] >= r["zero_shot"] - 0.5, r
            assert r["calibration"]["steps"] > 0 and r["calibration"]["cpu_seconds"] > 0
            n = results["settings"]["held_out_images"]
            assert r["gap_closed"] == gap_closed(r["zero_shot"], r["calibrated"], r["finetuned"], n)
    base, pi = rows["base, same geometry"], rows["patch 4->8, PI-resize"]
    naive = rows["patch 4->8, plain kernel interpolation"]
    assert pi["zero_shot"] > naive["zero_shot"] + 20  # PI-resize beats plain kernel interpolation
    assert abs(pi["zero_shot"] - base["zero_shot"]) <= 1.5
    assert rows["channels 1->3"]["zero_shot"] == base["zero_shot"]
    for r in results["rows"]:
        if not r["naive"]:
            assert r["finetuned"] > r["scratch"]  # adapted + fine-tune beats scratch with the same budget
    assert "kernel 4x4 -> 8x8 (PI-resize" in pi["non_copied"]["patch_embed.proj.weight"]
    assert rows["grid 8->12, bicubic pos-embed"]["calibrated"] is not None
    assert base["calibrated"] is None  # the base is its own teacher
    # The run-time patch size section (run_flexi_demo) ran in the same demo: each model at each patch size.
    flexi = results["flexi"]["rows"]
    assert {(r["model"], r["patch"]) for r in flexi} == {
        (m, p) for m in ("zero-shot", "single patch 4", "flexi 2/4/8", "calibrated 2/4/8") for p in FLEXI_PATCHES
    }
    acc = {(r["model"], r["patch"]): r["accuracy"] for r in flexi}
    assert acc[("zero-shot", 4)] >= 90  # the base at its own patch
    assert all(0 <= r["accuracy"] <= 100 and r["images_per_s"] > 0 for r in flexi)
    assert (tmp_path / "flexi.json").is_file() and (tmp_path / "flexi_accuracy_vs_throughput.png").stat().st_size > 0


def test_train_digits_base_needs_an_output_path(capsys):
    """Run from the repository root, no default path may overwrite the tracked configs/weights file: --out is asked."""
    from timm_anysize.apps.cli import main

    with pytest.raises(SystemExit) as info:
        main(["train-digits-base", "--epochs", "1"])
    assert info.value.code == 2
    assert "error: the following arguments are required: --out" in capsys.readouterr().err


def test_the_card_does_not_depend_on_the_working_directory(make_checkpoint, tmp_path, capsys):
    """A results.json in the folder a command runs in goes into no card: only one named by --demo-results does,
    and a named file that is missing is an error, not a card without its numbers."""
    from huggingface_hub import ModelCard

    from timm_anysize.apps.cli import main
    from timm_anysize.apps.demo import metrics_from_demo

    path, _ = make_checkpoint("test_vit")
    name = timm_anysize.register_variant(
        unique_name("demo"), base="test_vit", img_size=32, pretrained={"file": str(path)}
    )
    results = {"rows": [{"variant": name, "naive": False, "zero_shot": 90.0, "finetuned": 95.0, "scratch": 20.0}]}
    (tmp_path / "anysize-demo").mkdir()
    (tmp_path / "anysize-demo" / "results.json").write_text(json.dumps(results))
    (Path.cwd() / "anysize-demo").mkdir()  # where the old default (relative to the working directory) looked
    (Path.cwd() / "anysize-demo" / "results.json").write_text(json.dumps(results))
    assert main(["--quiet", "export", name, str(tmp_path / "plain")]) == 0
    assert ModelCard.load(tmp_path / "plain" / "README.md").data.eval_results is None
    named = str(tmp_path / "anysize-demo" / "results.json")
    assert main(["--quiet", "export", name, str(tmp_path / "named"), "--demo-results", named]) == 0
    card = ModelCard.load(tmp_path / "named" / "README.md")
    assert [r.metric_value for r in card.data.eval_results] == [90.0, 95.0, 20.0]
    capsys.readouterr()
    missing = tmp_path / "nosuch.json"
    assert main(["--quiet", "export", name, str(tmp_path / "x"), "--demo-results", str(missing)]) == 1
    assert capsys.readouterr().err == (
        f"timm-anysize export: error: {missing}: no such file; --demo-results names a results.json written by "
        "`timm-anysize demo`\n"
    )
    assert metrics_from_demo(None, name) == [] and not (tmp_path / "x").exists()
