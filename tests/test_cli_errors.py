"""Every failure of the command line is one line on stderr and a non-zero exit (2 for usage, 1 otherwise), with the
traceback only under --debug; a closed pipe ends quietly; a broken $TIMM_ANYSIZE_CONFIGS file breaks nothing else.

Each subcommand is driven with bad input in-process (main() is what the console script runs: nothing escapes it but
SystemExit); the console script itself, in subprocesses, for what only a real process shows (a traceback, a closed
pipe, the environment at import)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import timm_anysize
from conftest import unique_name
from timm_anysize.apps.cli import main
from timm_anysize.core.atomic import FolderExistsError

EXE = shutil.which("timm-anysize", path=str(Path(sys.executable).parent))


def console(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The installed console script, in a fresh process."""
    assert EXE is not None, "the timm-anysize console script is not installed next to this interpreter"
    return subprocess.run(
        [EXE, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=300
    )


def run_main(argv: list[str]) -> int:
    """main()'s exit status, a usage error's SystemExit included, as the console script's would be."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


# (argv, exit status, what the one line says); {tmp} is the test's folder
BAD_INPUT = {
    "list": (["list", "-c", "{tmp}/nosuch.yaml"], 1, "timm-anysize list: error: {tmp}/nosuch.yaml: no such file"),
    "show": (["show", "nosuch_variant"], 1, "timm-anysize show: error: 'nosuch_variant' is not a timm-anysize variant"),
    "check": (["check", "{tmp}/nosuch.yaml"], 1, "{tmp}/nosuch.yaml: no such file"),
    "demo": (["demo", "--epochs", "0"], 2, "timm-anysize demo: error: argument --epochs: a positive integer, got '0'"),
    "train-digits-base": (
        ["train-digits-base", "--epochs", "x"],
        2,
        "timm-anysize train-digits-base: error: argument --epochs: a positive integer, got 'x'",
    ),
    "export": (
        ["export", "nosuch_variant", "{tmp}/out"],
        1,
        "timm-anysize export: error: 'nosuch_variant' is not a timm-anysize variant",
    ),
    "push": (
        ["push", "nosuch_variant", "me/repo", "--dry-run"],
        1,
        "timm-anysize push: error: 'nosuch_variant' is not a timm-anysize variant",
    ),
    "run": (["run", "{tmp}/nosuch.py"], 1, "timm-anysize run: error: {tmp}/nosuch.py: no such script"),
    "convert": (
        ["convert", "{tmp}/nosuch.pth", "--base", "test_vit"],
        1,
        "timm-anysize convert: error: {tmp}/nosuch.pth: no such file or folder",
    ),
    "families": (["families", "--nope"], 2, "timm-anysize: error: unrecognized arguments: --nope"),
    "schema": (["schema", "extra"], 2, "timm-anysize: error: unrecognized arguments: extra"),
}


def test_every_subcommand_is_covered():
    from timm_anysize.apps.cli import _COMMANDS

    assert set(BAD_INPUT) == set(_COMMANDS)


@pytest.mark.parametrize("command", sorted(BAD_INPUT))
def test_bad_input_is_one_line_and_an_exit_status(command, tmp_path, capsys):
    argv, status, line = BAD_INPUT[command]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert run_main(argv) == status
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1 and captured.err.endswith("\n"), captured.err
    assert captured.err.startswith(line.replace("{tmp}", str(tmp_path))), captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_a_usage_error_is_one_line_with_status_2(capsys):
    assert run_main(["show"]) == 2
    assert capsys.readouterr().err == (
        "timm-anysize show: error: the following arguments are required: name (see timm-anysize show --help)\n"
    )
    assert run_main(["nosuch-command"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("timm-anysize: error: argument COMMAND: invalid choice")


def test_convert_errors_name_the_users_arguments(make_checkpoint, tmp_path, capsys):
    path, _ = make_checkpoint("test_vit", ".pth")
    assert run_main(["convert", str(path), "--base", "nosuch_arch"]) == 1
    assert capsys.readouterr().err == (
        "timm-anysize convert: error: --base: unknown timm model 'nosuch_arch' (see timm.list_models())\n"
    )
    assert run_main(["convert", str(path), "--base", "test_vit", "--img-size", "33", "--patch-size", "5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"timm-anysize convert: error: {path}: --patch-size [5, 5] must divide --img-size [33, 33]")
    assert run_main(["convert", str(path), "--base", "test_vit", "--layout", "nosuch"]) == 1
    assert capsys.readouterr().err.startswith("timm-anysize convert: error: unknown --layout 'nosuch'; choose one of")
    assert run_main(["convert", str(path), "--base", "test_vit", "--model-args", "{depth: 2}"]) == 1
    assert capsys.readouterr().err.startswith("timm-anysize convert: error: --model-args: not JSON (")
    for err in [capsys.readouterr().err]:
        assert "<dict>" not in err and "convert_" not in err and "pretrained." not in err


def test_an_export_into_an_existing_folder_is_one_line(make_checkpoint, tmp_path, capsys):
    path, _ = make_checkpoint("test_vit")
    name = unique_name("exp")
    (tmp_path / "v.yaml").write_text(f"variants:\n  {name}:\n    base: test_vit\n    pretrained:\n      file: {path}\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert run_main(["export", "-c", str(tmp_path / "v.yaml"), name, str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"timm-anysize export: error: {tmp_path / 'out'}")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_every_public_error_is_an_anysize_error_exported_from_the_package():
    errors = [getattr(timm_anysize, n) for n in timm_anysize.__all__ if n.endswith("Error")]
    assert timm_anysize.FolderExistsError is FolderExistsError and FolderExistsError in errors
    assert timm_anysize.ExportError in errors
    assert all(issubclass(e, timm_anysize.AnysizeError) and issubclass(e, ValueError) for e in errors)


# --- the console script, in fresh processes ------------------------------------------------------------------------


def test_console_script_one_line_then_debug_traceback(tmp_path):
    proc = console("run", str(tmp_path / "nosuch.py"))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"timm-anysize run: error: {tmp_path}/nosuch.py: no such script\n"
    proc = console("show", "nosuch_variant", "--debug")  # a global flag after the command
    assert proc.returncode == 1
    assert proc.stderr.startswith("Traceback (most recent call last):")
    assert "timm_anysize.core.errors.AnysizeError: 'nosuch_variant' is not a timm-anysize variant" in proc.stderr


def test_a_closed_pipe_ends_quietly():
    """`timm-anysize schema | head -1`: the reader goes away after one line; no "Broken pipe", no traceback."""
    proc = subprocess.Popen([EXE, "schema"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"{\n"
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) in (0, 141) and err == b""


def test_a_broken_env_file_is_one_line_and_breaks_no_other_command(tmp_path):
    """--help and list run; each reports the broken file once, naming it and the key; check exits 1 on it. `list`
    shows exactly what list_variants() does in a fresh process, plus the -c file's variants (no digits variants)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants:\n  env_bad:\n    base: test_vit\n    img_sise: 3\n")
    mine = tmp_path / "mine.yaml"
    name = unique_name("mine")
    mine.write_text(f"variants:\n  {name}:\n    base: test_vit\n    img_size: 48\n")
    env = {"TIMM_ANYSIZE_CONFIGS": str(bad)}
    warning = f"$TIMM_ANYSIZE_CONFIGS: {bad}: env_bad.img_sise: unknown key; did you mean 'img_size'?"
    helped = console("--help", env=env)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: timm-anysize")
    assert len(helped.stderr.splitlines()) == 1 and helped.stderr.startswith(warning)
    listed = console("list", "--json", "-c", str(mine), env=env)
    assert listed.returncode == 0 and len(listed.stderr.splitlines()) == 1 and listed.stderr.startswith(warning)
    fresh = subprocess.run(
        [sys.executable, "-c", "import json, timm_anysize; print(json.dumps(timm_anysize.list_variants()))"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert fresh.stderr.startswith(warning)
    names = [row["name"] for row in json.loads(listed.stdout)]
    assert names == sorted([*json.loads(fresh.stdout), name]) and not any(n.startswith("vit_digits") for n in names)
    checked = console("check", str(mine), env=env)
    assert checked.returncode == 1
    assert f"{mine}: ok (1 variants: {name})" in checked.stdout
    assert checked.stderr.splitlines()[1:] == [
        f"{bad}: env_bad.img_sise: unknown key; did you mean 'img_size'? (allowed: base, img_size, patch_size, "
        "in_chans, num_classes, model_args, dynamic, pad, flexi, pretrained, adapt, data, card) "
        "(from $TIMM_ANYSIZE_CONFIGS)"
    ]
