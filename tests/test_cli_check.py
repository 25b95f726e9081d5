"""`timm-anysize check` checks what timm.create_model(name, pretrained=True) will need, without building the model,
reading the weights or touching the network: one line per problem and exit status 1."""

from __future__ import annotations

import json

import pytest

from conftest import unique_name
from timm_anysize.apps.cli import main

HF_VIT = "vit"  # not family rows: transformers' model_type


def test_a_missing_weight_file_a_malformed_hub_id_and_a_contradicting_config_json(make_checkpoint, tmp_path, capsys):
    weights, _ = make_checkpoint("test_vit")  # test_vit: 160 px, patch 16, 3 channels
    (weights.parent / "config.json").write_text(
        json.dumps({"model_type": HF_VIT, "image_size": 224, "patch_size": 16, "num_channels": 1})
    )
    missing, hub, stated, fine = (unique_name(p) for p in ("missing", "hub", "stated", "fine"))
    yaml = tmp_path / "v.yaml"
    yaml.write_text(
        "variants:\n"
        f"  {missing}:\n    base: test_vit\n    pretrained:\n      file: weights/nosuch.safetensors\n"
        f"  {hub}:\n    base: test_vit\n    pretrained:\n      hf_hub_id: me//bad--name\n"
        f"  {stated}:\n    base: test_vit\n    pretrained:\n      file: {weights}\n      img_size: 160\n      in_chans: 3\n"
        f"  {fine}:\n    base: test_vit\n    img_size: 64\n"
    )
    assert main(["check", str(yaml)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"{yaml}: {missing}: pretrained.file {tmp_path}/weights/nosuch.safetensors: no such file or folder",
        f"{yaml}: {hub}: pretrained.hf_hub_id 'me//bad--name' is not a Hub repo id (Repo id must be in the form "
        "'repo_name' or 'namespace/repo_name': 'me//bad--name'. Use `repo_type` argument if needed.)",
        f"{yaml}: {stated}: pretrained.img_size: config.json beside the weights says image_size [224, 224], the "
        "variant's source geometry is [160, 160]; set pretrained.img_size: [224, 224], or leave it out",
        f"{yaml}: {stated}: pretrained.in_chans: config.json beside the weights says num_channels 1, the variant's "
        "source has 3; set pretrained.in_chans: 1",
    ]


def test_a_registered_variant_and_a_config_file_are_checked_by_name(make_checkpoint, tmp_path, capsys):
    weights, _ = make_checkpoint("test_vit")
    name, gone = unique_name("named"), unique_name("gone")
    yaml = tmp_path / "v.yaml"
    yaml.write_text(
        f"variants:\n  {name}:\n    base: test_vit\n    pretrained:\n      file: {weights}\n"
        f"  {gone}:\n    base: test_vit\n    pretrained:\n      file: {weights}.old\n"
    )
    assert main(["check", "-c", str(yaml)]) == 1  # -c: checked like a file argument (and not registered)
    assert capsys.readouterr().err == f"{yaml}: {gone}: pretrained.file {weights}.old: no such file or folder\n"
    assert main(["check", "-c", str(yaml), gone]) == 1  # a name of a -c file: checked with its file, reported once
    assert capsys.readouterr().err == f"{yaml}: {gone}: pretrained.file {weights}.old: no such file or folder\n"
    assert main(["show", "-c", str(yaml), name]) == 0  # registered by -c (validated: the geometry is fine)
    capsys.readouterr()
    assert main(["check", name]) == 0
    assert capsys.readouterr().out == f"{name}: ok\n"
    assert main(["check", gone]) == 1
    assert capsys.readouterr().err == f"{yaml}: {gone}: pretrained.file {weights}.old: no such file or folder\n"


def test_check_with_nothing_to_check_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.delenv("TIMM_ANYSIZE_CONFIGS", raising=False)
    with pytest.raises(SystemExit) as exit:
        main(["check"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == (
        "timm-anysize check: error: name YAML files or variants to check (or list files in $TIMM_ANYSIZE_CONFIGS) "
        "(see timm-anysize check --help)\n"
    )


def test_a_file_with_several_bad_variants_is_one_line_each(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "variants:\n  a_bad:\n    base: test_vit\n    img_sise: 3\n  b_bad:\n    base: test_vit\n    pad: 3\n"
    )
    assert main(["check", str(bad)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{bad}: a_bad.img_sise: unknown key; did you mean 'img_size'?")
    assert lines[1].startswith(f"{bad}: b_bad.pad: ")
