"""Calibration without labels (timm_anysize.calibrate): the variant's source model at its own geometry is the
teacher; distilling it into the variant from unlabelled images raises their agreement, deterministically, in place,
and never leaves a half-applied step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import timm_anysize
from conftest import run_torchrun, save_checkpoint, unique_name
from timm_anysize.apps.digits import load_digits_split, register_demo_variants
from timm_anysize.calibration import build_teacher, calibrate, geometry_bound_parameters, save_calibrated
from timm_anysize.calibration_images import default_channel_map
from timm_anysize.core.errors import CalibrationError


@pytest.fixture
def trained_vit(make_checkpoint):
    """A test_vit checkpoint with confident logits (perturbed weights, a scaled head): agreement is meaningful."""
    path, base = make_checkpoint("test_vit", num_classes=10, img_size=64)
    with torch.no_grad():  # confident logits: top-1 agreement then measures something
        base.head.weight.mul_(20)

    return save_checkpoint(base, path), base


def _variant(path, **geometry) -> str:
    return timm_anysize.register_variant(
        unique_name("cal"),
        base="test_vit",
        pretrained={"file": str(path), "num_classes": 10, "img_size": 64},
        num_classes=10,
        **geometry,
    )


def _images(n: int = 96, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0, 1] (blurred noise: structure at every scale, like photos, unlike white noise)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 8, size // 8, generator=gen)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def test_the_teacher_is_the_source_model_with_the_source_weights(trained_vit):
    path, base = trained_vit
    model = timm.create_model(_variant(path, img_size=48, patch_size=8), pretrained=True)
    teacher = build_teacher(model)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(teacher(x), base.eval()(x))  # the same checkpoint at its own geometry, bit for bit


@pytest.fixture(scope="module")
def digits():
    """The demo's trained digits ViT (97 % at 32 px, patch 4) and its unlabelled training images: a teacher whose
    answers mean something."""
    register_demo_variants()
    return load_digits_split().train_x[:400]


def test_agreement_with_the_teacher_rises_at_a_new_size(digits):
    model = timm.create_model("vit_digits_patch4_24", pretrained=True).eval()
    report = calibrate(model, digits, steps=40, batch_size=32, lr=3e-4, held_out=128, progress=False)
    (geometry,) = report.geometries
    assert report.target == "logits" and report.completed and report.steps == 40 == len(report.losses)
    assert report.agreement_after[geometry] > report.agreement_before[geometry], report.summary()
    assert report.loss_after[geometry] < report.loss_before[geometry]
    assert model.training is False  # the mode it was in


def test_headless_variants_distil_pooled_features(digits):
    spec = timm_anysize.get_variant("vit_digits_patch4_24").model_dump(exclude_unset=True, exclude={"name"})
    name = timm_anysize.register_variant(unique_name("cal"), **{**spec, "num_classes": 0})
    model = timm.create_model(name, pretrained=True)
    report = calibrate(model, digits, steps=40, batch_size=32, lr=3e-4, held_out=128, progress=False)
    (g,) = report.geometries
    assert report.target == "features" and report.metric == "pooled-feature cosine"
    assert report.agreement_after[g] > report.agreement_before[g], report.summary()


def test_calibration_is_deterministic_given_a_seed(trained_vit):
    path, _ = trained_vit
    name = _variant(path, img_size=48)
    states = []
    for _ in range(2):
        model = timm.create_model(name, pretrained=True)
        calibrate(model, _images(48), steps=4, batch_size=8, progress=False, seed=3)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_geometry_only_trains_the_tensors_bound_to_the_geometry(trained_vit):
    path, _ = trained_vit
    model = timm.create_model(_variant(path, img_size=48, patch_size=8), pretrained=True)
    names = set(geometry_bound_parameters(model))
    assert {"pos_embed", "patch_embed.proj.weight", "norm.weight"} <= names
    assert not any(".attn.qkv" in n or ".mlp." in n for n in names)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibrate(model, _images(48), steps=3, batch_size=8, trainable="geometry", progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= names, changed - names


def test_a_gray_variant_of_an_rgb_checkpoint_agrees_fully_before_any_step(trained_vit):
    """Same size and patch, one channel: the adapted stem on a gray image equals the source on the gray image
    repeated to RGB, so the student agrees with the teacher on every held-aside image before calibration."""
    path, _ = trained_vit
    model = timm.create_model(
        _variant(path, img_size=64, in_chans=1, data={"mean": [0.5], "std": [0.5]}), pretrained=True
    )
    report = calibrate(model, _images(40)[:, :1], steps=0, progress=False)
    assert list(report.agreement_before.values()) == [100.0]


def test_many_geometries_at_once_are_each_measured(trained_vit):
    path, _ = trained_vit
    model = timm.create_model(_variant(path, img_size=48, patch_size=8), pretrained=True)
    report = calibrate(model, _images(), steps=2, batch_size=8, img_sizes=[32, 48], patch_sizes=[8, 16], progress=False)
    assert report.geometries == [
        "32x32 px, patch 8x8",
        "32x32 px, patch 16x16",
        "48x48 px, patch 8x8",
        "48x48 px, patch 16x16",
    ]
    assert set(report.agreement_after) == set(report.geometries)
    assert timm_anysize.get_patch_size(model) == (8, 8)  # the run-time patch size is restored


def test_a_folder_of_images_any_nesting(trained_vit, tmp_path):
    path, _ = trained_vit
    gen = np.random.default_rng(0)
    for i in range(12):
        folder = tmp_path / "imgs" / f"class{i % 3}" / ("deep" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gen.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    model = timm.create_model(_variant(path, img_size=48), pretrained=True)
    report = calibrate(model, tmp_path / "imgs", steps=1, batch_size=4, held_out=4, progress=False)
    assert report.images + report.held_out == 12


def test_ctrl_c_stops_between_steps_and_keeps_every_completed_step(trained_vit):
    path, _ = trained_vit
    model = timm.create_model(_variant(path, img_size=48), pretrained=True)
    calls = []

    def interrupt_on_the_third_training_forward(module, args):
        if module.training:
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGINT)

    handle = model.register_forward_pre_hook(interrupt_on_the_third_training_forward)
    # Python's own Ctrl-C handler: xdist starts its workers with SIGINT ignored (the kill would then do nothing)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        report = calibrate(model, _images(48), steps=10, batch_size=4, progress=False)
    finally:
        signal.signal(signal.SIGINT, previous)
        handle.remove()
    assert not report.completed and report.steps == 2 and len(report.losses) == 2
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_errors_name_the_bad_input(trained_vit, tmp_path):
    path, _ = trained_vit
    model = timm.create_model(_variant(path, img_size=48), pretrained=True)
    with pytest.raises(CalibrationError, match="not a timm-anysize variant"):
        calibrate(timm.create_model("test_vit"), _images(8))
    with pytest.raises(CalibrationError, match="no images"):
        calibrate(model, torch.empty(0, 3, 32, 32))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(CalibrationError, match=r"x\.png: cannot be read as an image"):
        calibrate(model, tmp_path / "bad")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(CalibrationError, match="empty: no image files"):
        calibrate(model, tmp_path / "empty")
    with pytest.raises(CalibrationError, match="trainable='some'"):
        calibrate(model, _images(8), trainable="some")
    assert issubclass(CalibrationError, timm_anysize.AnysizeError)


def test_the_default_channel_map_is_the_adapted_stems_rule():
    x = torch.rand(1, 3, 2, 2)
    assert torch.equal(default_channel_map(x, 4), torch.cat([x, x[:, :1]], 1))
    assert torch.equal(default_channel_map(x, 1), x.mean(1, keepdim=True))
    assert torch.equal(default_channel_map(x[:, :1], 3), x[:, :1].expand(-1, 3, -1, -1))


def _assert_same_model(loaded: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor) -> None:
    """Every tensor bit-identical, every one copied, the same outputs."""
    own = model.state_dict()
    assert loaded.state_dict().keys() == own.keys()
    assert all(torch.equal(v, own[k]) for k, v in loaded.state_dict().items())
    assert timm_anysize.adaptation_report(loaded).non_copied() == []
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_a_calibrated_file_loads_back_as_the_variants_weights_every_tensor_copied(trained_vit, tmp_path):
    """The saved file states its geometry in its metadata: named by pretrained_cfg_overlay, or by a YAML variant's
    pretrained.file (without a geometry, or with the original weights' geometry), it is a same-geometry source."""
    path, _ = trained_vit
    name = _variant(path, img_size=48, patch_size=8)
    model = timm.create_model(name, pretrained=True)
    report = calibrate(model, _images(48), steps=3, batch_size=8, lr=1e-3, progress=False)
    out = save_calibrated(model, report, tmp_path / "calibrated.safetensors")
    assert not torch.equal(model.state_dict()["pos_embed"], timm.create_model(name, pretrained=True).pos_embed)
    x = _images(4, 48, seed=1)
    _assert_same_model(timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(out))), model, x)
    yaml = tmp_path / "calibrated.yaml"
    again, stated = unique_name("cal"), unique_name("cal")
    yaml.write_text(
        "variants:\n"
        f"  {again}:\n    base: test_vit\n    img_size: 48\n    patch_size: 8\n    num_classes: 10\n"
        "    pretrained: {file: calibrated.safetensors}\n"
        f"  {stated}:\n    base: test_vit\n    img_size: 48\n    patch_size: 8\n    num_classes: 10\n"
        "    pretrained: {file: calibrated.safetensors, img_size: 64, patch_size: 16}\n"
    )
    timm_anysize.register_yaml(yaml)
    for variant in (again, stated):
        _assert_same_model(timm.create_model(variant, pretrained=True), model, x)


def test_the_command_line_writes_weights_that_load_back_as_the_variant(trained_vit, tmp_path, capsys):
    from timm_anysize.apps.cli import main

    path, _ = trained_vit
    name = _variant(path, img_size=48, patch_size=8)
    gen = np.random.default_rng(0)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i in range(16):
        Image.fromarray(gen.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "a" / f"{i}.png")
    out = tmp_path / "calibrated.safetensors"
    argv = ["calibrate", name, "--images", str(tmp_path / "imgs"), "--steps", "2", "--batch-size", "4", "-q"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    side = tmp_path / "calibrated.calibration.json"
    assert out.is_file() and side.is_file() and str(tmp_path) not in side.read_text()
    overlay = f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file={str(out)!r}))"
    assert overlay in printed.splitlines()[-2]
    assert printed.splitlines()[-1].strip().startswith('or, in the variant\'s YAML: pretrained: {"file": "calibrated')
    loaded = eval(overlay.split("  ")[-1]).eval()
    assert timm_anysize.adaptation_report(loaded).non_copied() == []
    calibrated = load_file(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in calibrated.items())


CALIBRATE_SCRIPT = """
import json, os, sys, timm, torch, torch.distributed as dist
import timm_anysize
from timm_anysize.apps.digits import load_digits_split, register_demo_variants
register_demo_variants()
distributed = "RANK" in os.environ
if distributed:
    dist.init_process_group("gloo")
model = timm.create_model("vit_digits_patch4_24", pretrained=True)
report = timm_anysize.calibrate(model, load_digits_split().train_x[:96], steps=3, batch_size=8, progress=False)
if not distributed or dist.get_rank() == 0:
    torch.save(model.state_dict(), sys.argv[1])
if distributed:
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo can abort at interpreter shutdown (see tests/test_flexi.py); the work is done and written
"""


def test_two_ddp_ranks_give_the_weights_of_one_process_with_the_same_global_batch(tmp_path):
    """Under torchrun (gloo, 2 ranks) each rank takes half of every global batch and the gradients are averaged:
    the weights are those of one process with the same batch_size, up to the order of the float sums."""
    register_demo_variants()
    (tmp_path / "calibrate.py").write_text(CALIBRATE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, str(tmp_path / "calibrate.py"), str(tmp_path / "one.pt")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    run_torchrun(str(tmp_path / "calibrate.py"), str(tmp_path / "two.pt"))
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("one.pt", "two.pt"))
    start = timm.create_model("vit_digits_patch4_24", pretrained=True).state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # calibration changed the weights
    # Float sums in another order differ in the last bits; Adam divides each gradient by its own scale, so where the
    # exact gradient is zero (a key bias: softmax ignores it) that noise becomes a step of its own. Those entries
    # differ by ~1e-5 after 3 steps (a sign flip would be 1e-3); every other tensor agrees to 1e-6.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=5e-5 if k.endswith("attn.qkv.bias") else 1e-6, msg=k)


def test_an_export_of_calibrated_weights_carries_the_calibration_into_the_card(trained_vit, tmp_path):
    """export (and push, which renders the card through export) of a variant whose weights are a calibrated file:
    the card says what the calibration did, per geometry, and names no local path."""
    from huggingface_hub import ModelCard

    path, _ = trained_vit
    name = _variant(path, img_size=48, patch_size=8)
    model = timm.create_model(name, pretrained=True)
    report = calibrate(model, _images(48), steps=2, batch_size=8, patch_sizes=[8, 12], progress=False)
    weights = save_calibrated(model, report, tmp_path / "weights" / "calibrated.safetensors")
    folder = timm_anysize.export(name, tmp_path / "export", file=weights)
    card = (folder / "README.md").read_text()
    assert str(tmp_path) not in card and str(tmp_path) not in (folder / "anysize_report.json").read_text()
    assert "## Calibration without labels" in card
    assert (
        f"the variant learnt from its teacher, test_vit at {report.teacher.split(' at ', 1)[1]}, on "
        f"{report.images} unlabelled images (2 steps of 8 images, lr 0.0002, all parameters). Agreement with the "
        f"teacher (top-1 agreement (%)) on {report.held_out} held-aside images:"
    ) in card
    for g in ("48x48 px, patch 8x8", "48x48 px, patch 12x12"):
        assert f"| {g} | {report.agreement_before[g]} | {report.agreement_after[g]} |" in card
    ModelCard.load(folder / "README.md")  # still a valid card
    plain = timm_anysize.export(name, tmp_path / "plain")
    assert "Calibration" not in (plain / "README.md").read_text()
    (weights.parent / "calibrated.calibration.json").unlink()  # the file's metadata alone carries it
    again = timm_anysize.export(name, tmp_path / "again", file=weights)
    assert (again / "README.md").read_text() == card
