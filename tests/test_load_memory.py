"""Loading holds the weights once (issue 20): peak memory of a load and of a streaming convert, measured in fresh
processes; timm's dtype/device factory kwargs on variants.

Memory is far less noisy than time: the bounds are the promised ones with a fixed slack for the process's own
allocations (torch's first kernels, the adaptation's small resampled tensors).
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import timm
import torch
from load_memory_child import rss, run_child
from safetensors.torch import load_file, save_file

import timm_anysize
from conftest import unique_name
from timm_anysize.convert import convert_checkpoint
from timm_anysize.core.meta import parameters_uninitialised

BASE = "vit_base_patch16_224"  # 86M parameters: 330 MB in float32
GEOMETRY = dict(img_size=98, patch_size=14, in_chans=4)  # every geometry change at once
SLACK = 48 * 2**20


@pytest.fixture(scope="module")
def vit_b_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("vit_b")
    files = {"safetensors": folder / "w.safetensors", "pth": folder / "w.pth"}
    for path in files.values():
        run_child("make", str(path), BASE, "float32")
    return files


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_loading_adds_about_the_model_once(vit_b_files: dict[str, Path], fmt: str) -> None:
    # Parameters built on meta take the memory-mapped checkpoint's tensors (assign); timm's own load adds 2x.
    got = run_child("load", str(vit_b_files[fmt]), BASE, json.dumps(GEOMETRY))
    bound = 1.1 * got["model_bytes"] + got["largest"] + SLACK
    assert got["model_bytes"] > 300 * 2**20
    assert got["added"] <= bound, f"{fmt}: added {got['added'] / 2**20:.0f} MiB > bound {bound / 2**20:.0f} MiB"
    assert "resampled" in got["report"] and "adapted" in got["report"]


def test_streaming_convert_holds_a_few_tensors(vit_b_files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    got = run_child("convert", str(vit_b_files["safetensors"]), BASE, json.dumps(GEOMETRY), str(out))
    largest = 4 * 768 * 3072  # an MLP matrix in float32, 9 MiB
    assert got["added"] <= 4 * largest + SLACK, f"convert added {got['added'] / 2**20:.0f} MiB"
    assert "pos_embed" in got["resampled"]
    converted = load_file(str(out))
    plain = timm.create_model(BASE, pretrained=False, **GEOMETRY)
    plain.load_state_dict(converted, strict=True)  # the file plain timm loads at the variant's geometry


def test_convert_writes_nothing_when_a_key_does_not_fit(tmp_path: Path) -> None:
    sd = timm.create_model("test_vit").state_dict()
    sd["mystery"] = torch.zeros(3)
    save_file(sd, str(tmp_path / "w.safetensors"))
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous")
    spec = timm_anysize.core.spec.parse_variant(
        unique_name(), dict(base="test_vit", img_size=64, pretrained={"file": str(tmp_path / "w.safetensors")})
    )
    with pytest.raises(timm_anysize.AdaptationError, match="mystery"):
        convert_checkpoint(spec, out)
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == [
        "out.safetensors",
        "w.safetensors",
    ]


def _checkpoint(tmp_path: Path, base: str, model_args: dict, dtype: torch.dtype) -> tuple[Path, dict]:
    torch.manual_seed(0)
    model = timm.create_model(base, **model_args)
    sd = {
        k: (v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v).to(dtype)
        for k, v in model.state_dict().items()
    }
    path = tmp_path / f"{base}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path, sd


FAMILIES = [
    ("test_vit", {}),
    ("swin_tiny_patch4_window7_224", dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))),
    ("eva02_tiny_patch14_224", dict(depth=2, embed_dim=64, num_heads=2)),
]


@pytest.mark.parametrize("base,model_args", FAMILIES, ids=[b for b, _ in FAMILIES])
def test_dtype_kwarg_builds_and_loads_in_that_dtype(tmp_path: Path, base: str, model_args: dict) -> None:
    # A float32 checkpoint into a bfloat16 model (and a bfloat16 one into float32): each tensor converted alone;
    # the copied ones are exactly the checkpoint's, cast.
    for file_dtype, model_dtype in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)):
        path, sd = _checkpoint(tmp_path, base, model_args, file_dtype)
        name = timm_anysize.register_variant(
            unique_name(), base=base, model_args=model_args, pretrained={"file": str(path)}
        )
        model = timm.create_model(name, pretrained=True, dtype=model_dtype)
        floats = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        assert {v.dtype for v in floats.values()} == {model_dtype}
        for key in timm_anysize.adaptation_report(model).by_action("copied"):
            if key in floats:
                assert torch.equal(floats[key], sd[key].to(model_dtype)), key
        size = model.pretrained_cfg["input_size"]
        with torch.no_grad():
            y = model.eval()(torch.randn(1, *size, dtype=model_dtype))
        assert y.dtype == model_dtype and bool(torch.isfinite(y.float()).all())


def test_device_kwarg_places_the_model(tmp_path: Path) -> None:
    path, sd = _checkpoint(tmp_path, "test_vit", {}, torch.float32)
    name = timm_anysize.register_variant(unique_name(), base="test_vit", img_size=64, pretrained={"file": str(path)})
    model = timm.create_model(name, pretrained=True, device="cpu")
    assert {t.device.type for t in model.state_dict().values()} == {"cpu"}
    shapes_only = timm.create_model(name, pretrained=True, device="meta")
    assert {t.device.type for t in shapes_only.parameters()} == {"meta"}
    assert shapes_only.pos_embed.shape == model.pos_embed.shape


def test_uninitialised_builds_in_two_threads_leave_each_other_and_torch_intact() -> None:
    """Thread A enters, thread B enters, A leaves, then B builds: B's parameters are still never written (a 64 MiB
    weight adds no resident memory), and once both have left ``nn.Module.register_parameter`` is torch's again."""
    original = torch.nn.Module.register_parameter
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    grown: list[int] = []

    def thread_a() -> None:
        with parameters_uninitialised():
            a_in.set()
            b_in.wait(30)
        a_out.set()

    def thread_b() -> None:
        a_in.wait(30)
        with parameters_uninitialised():
            b_in.set()
            a_out.wait(30)
            before = rss()
            layer = torch.nn.Linear(4096, 4096, bias=False)  # 64 MiB, its init skipped: pages never touched
            grown.append(rss() - before)
            del layer

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert grown and grown[0] < 16 * 2**20, grown
    assert torch.nn.Module.register_parameter is original
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64, bias=False)  # outside any build: initialised as usual, exactly
    torch.manual_seed(0)
    expected = torch.nn.init.kaiming_uniform_(torch.empty(64, 64), a=math.sqrt(5))
    assert torch.equal(layer.weight, expected)
