"""The CLI: list, show, check; errors are one line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

from timm_anysize.apps.cli import main


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("vit_tiny_patch4_64 "))
    assert "vit_tiny_patch16_224.augreg_in21k_ft_in1k" in row and "64x64/p4x4/1ch/10cls" in row


def test_show_prints_spec_and_plan(capsys):
    assert main(["show", "vit_tiny_patch4_64"]) == 0
    out = capsys.readouterr().out
    assert "base: vit_tiny_patch16_224.augreg_in21k_ft_in1k" in out
    assert "source: 224x224 px, patch 16x16, grid 14x14 (+1 prefix), 3 ch, 1000 classes" in out
    assert "pos_embed: resample grid 14x14 -> 16x16" in out
    assert "patch_embed.proj.weight: resize kernel 16x16 -> 4x4 (FlexiViT PI-resize" in out
    assert "adapt input channels 3 -> 1" in out and "head.weight: new head: num_classes 1000 -> 10" in out


def test_show_is_the_variant_as_written_plus_what_it_resolves_to(capsys):
    """Only the keys the YAML sets (a square size as one number), then the resolved geometries, the dynamic choice,
    the memory estimate and the plan; no unset option printed as null."""
    assert main(["show", "vit_tiny_patch4_64"]) == 0
    out = capsys.readouterr().out
    spec, resolved = out.split("# resolved (no weights read)")
    assert spec.splitlines()[1:7] == [
        "vit_tiny_patch4_64:",
        "  base: vit_tiny_patch16_224.augreg_in21k_ft_in1k",
        "  img_size: 64",
        "  patch_size: 4",
        "  in_chans: 1",
        "  num_classes: 10",
    ]
    assert "null" not in spec and "model_args" not in spec and "pad:" not in spec
    lines = resolved.strip().splitlines()
    assert lines[:4] == [
        "family: vit",
        "source: 224x224 px, patch 16x16, grid 14x14 (+1 prefix), 3 ch, 1000 classes",
        "target: 64x64 px, patch 4x4, grid 16x16 (+1 prefix), 1 ch, 10 classes",
        "dynamic: yes: any input size",
    ]
    assert (
        lines[4].startswith("memory: ~")
        and "at 257 tokens: weights " in lines[4]
        and "(3 heads, one image)" in lines[4]
    )
    assert lines[5] == "adaptation:" and lines[-1] == "  every other tensor: copied"


def test_show_all_prints_every_field(capsys):
    assert main(["show", "--all", "vit_tiny_patch4_64"]) == 0
    out = capsys.readouterr().out
    assert "  img_size:\n  - 64\n  - 64\n" in out and "  dynamic: null\n" in out and "  pad: true\n" in out
    assert "memory: ~" in out and "pos_embed: resample grid 14x14 -> 16x16" in out


def test_show_unknown_name_is_one_line(capsys):
    assert main(["show", "vit_tiny_patch4_46"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(
        "timm-anysize show: error: 'vit_tiny_patch4_46' is not a timm-anysize variant; did you mean vit_tiny_patch4_64"
    )


def test_check(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("variants:\n  check_ok:\n    base: test_vit\n    img_size: 64\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "variants:\n  check_bad:\n    base: test_vit\n    patch_size: 7\n  vit_small_patch16_224:\n    base: test_vit\n"
    )
    assert main(["check", str(good)]) == 0
    assert "good.yaml: ok (1 variants: check_ok)" in capsys.readouterr().out
    assert main(["check", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml: check_bad.img_size: the target patch size [7, 7] must divide" in err
    assert "bad.yaml: vit_small_patch16_224: the name collides with timm's built-in" in err


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "timm_anysize.apps.cli", "check", "/nonexistent.yaml"], capture_output=True, text=True
    )
    assert out.returncode == 1 and "/nonexistent.yaml: no such file" in out.stderr
