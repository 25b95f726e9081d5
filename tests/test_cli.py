"""The CLI: list, show, check; the conventions of hf and pip (global flags anywhere, --version, --json, help on every
argument)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import pytest
import timm

import timm_anysize
from conftest import unique_name
from timm_anysize.apps.cli import _COMMANDS, build_parser, main
from timm_anysize.apps.digits import DEMO_CONFIG
from timm_anysize.families import family_of


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


# --- conventions: global flags anywhere, --version, --json, help on every argument ----------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_global_flags_before_or_after_the_command():
    parse = build_parser().parse_args
    for argv in (["-q", "--debug", "list"], ["list", "--quiet", "--debug"], ["--quiet", "list", "--debug"]):
        args = parse(argv)
        assert (args.quiet, args.debug) == (True, True), argv
    args = parse(["list"])
    assert not hasattr(args, "quiet") and not hasattr(args, "debug")  # main() reads them with getattr(..., False)
    args = parse(["-q", "show", "x", "-c", "a.yaml", "--config", "b.yaml"])
    assert args.quiet and args.config == ["a.yaml", "b.yaml"]
    assert parse(["-v", "list"]).verbose and parse(["list", "--verbose"]).verbose


def test_quiet_and_verbose_together_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["-q", "list", "--verbose"])
    assert exit.value.code == 2 and "-q/--quiet and -v/--verbose together: pick one" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out == f"timm-anysize {timm_anysize.__version__}\n"


def test_every_argument_has_help_and_no_sphinx_markup():
    parser = build_parser()
    commands = _subparsers(parser)
    assert set(commands) == set(_COMMANDS)
    for name, p in [("", parser), *commands.items()]:
        for action in p._actions:
            assert action.help, f"{name}: {action.dest} has no help"
        text = p.format_help()
        assert not re.search(r":(func|class|mod|meth|data|attr):|``", text), name
    takes_a_variant = {"list", "show", "check", "export", "push", "run", "convert", "calibrate"}
    assert {n for n, p in commands.items() if "--config" in p.format_help()} == takes_a_variant


def test_list_json_fields(capsys):
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == timm_anysize.list_variants()
    row = next(r for r in rows if r["name"] == "vit_tiny_patch4_64")
    assert row == {
        "name": "vit_tiny_patch4_64",
        "base": "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
        "origin": row["origin"],
        "geometry": {
            "img_size": [64, 64],
            "patch_size": [4, 4],
            "grid_size": [16, 16],
            "num_prefix_tokens": 1,
            "in_chans": 1,
            "num_classes": 10,
        },
        "dynamic": True,
        "weights": {"source": "base", "location": "vit_tiny_patch16_224.augreg_in21k_ft_in1k"},
        "error": None,
    }
    assert row["origin"].endswith("vit.yaml")


def test_show_json_fields(tmp_path, capsys):
    name = unique_name("json")
    (tmp_path / "v.yaml").write_text(f"variants:\n  {name}:\n    base: test_vit\n    img_size: [48, 64]\n")
    assert main(["show", name, "--json", "-c", str(tmp_path / "v.yaml")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert list(shown) == [
        "name", "origin", "spec", "family", "source", "target", "dynamic", "memory", "adaptation", "checkpoint"
    ]  # fmt: skip
    assert shown["name"] == name and shown["origin"] == str(tmp_path / "v.yaml")
    assert shown["spec"] == {"base": "test_vit", "img_size": [48, 64]}
    assert shown["family"] == family_of(timm.create_model("test_vit")).name
    assert shown["target"]["img_size"] == [48, 64] and shown["source"]["img_size"] == [160, 160]
    assert set(shown["memory"]) == {"float32_bytes", "bfloat16_bytes", "over_budget", "description"}
    assert shown["adaptation"] == [{"key": "pos_embed", "how": shown["adaptation"][0]["how"]}]
    assert shown["adaptation"][0]["how"].startswith("resample grid 10x10 -> 3x4") and shown["checkpoint"] is None


def test_list_shows_no_variant_it_was_not_asked_for(capsys):
    """The demo's digits variants only with the demo's YAML: `list` is what list_variants() is in this process."""
    assert main(["list", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == timm_anysize.list_variants()


def test_an_unknown_name_says_how_to_register_ones_own_yaml(capsys):
    assert main(["export", "mine_gray_48", "out"]) == 1
    assert capsys.readouterr().err.endswith(
        "(a variant of your own YAML: -c FILE.yaml, or list the file in $TIMM_ANYSIZE_CONFIGS)\n"
    )
    if "vit_digits_patch4_24" in timm_anysize.list_variants():
        pytest.skip("this worker registered the demo's variants (another test did)")
    assert main(["show", "vit_digits_patch4_24"]) == 1
    assert capsys.readouterr().err.endswith(f"(the demo's digits variants: -c {DEMO_CONFIG})\n")
