"""Run by tests/test_load_memory.py in a fresh process: one load or convert, printing what it added to the peak
resident memory (VmHWM, reset just before) as JSON.

    python load_memory_child.py make FILE BASE DTYPE        # a random checkpoint (.safetensors streamed, or .pth)
    python load_memory_child.py load FILE BASE GEOMETRY_JSON
    python load_memory_child.py features FILE BASE GEOMETRY_JSON    # the load, with features_only=True
    python load_memory_child.py convert FILE BASE GEOMETRY_JSON OUT
    python load_memory_child.py forward - BASE GEOMETRY_JSON     # build (random init) and one forward at its size
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import timm
import torch

import timm_anysize
from timm_anysize.convert import convert_checkpoint
from timm_anysize.core.meta import meta_device
from timm_anysize.core.safetensors_io import write_safetensors
from timm_anysize.core.spec import parse_variant
from timm_anysize.plan import make_plan


def run_child(*args: str) -> dict:
    """Run this script with ``args`` in a fresh process; what it printed, as JSON."""
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def make(file: Path, base: str, dtype: torch.dtype) -> None:
    with meta_device():
        shapes = {k: v.shape for k, v in timm.create_model(base).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tensors = ((k, (torch.randn(s, generator=gen) * 0.02).to(dtype)) for k, s in shapes.items())
    if file.suffix == ".safetensors":
        write_safetensors(file, [(k, dtype, tuple(s)) for k, s in shapes.items()], tensors)
    else:
        torch.save(dict(tensors), file)


def main(argv: list[str]) -> dict:
    torch.set_num_threads(1)
    mode, file, base = argv[0], Path(argv[1]), argv[2]
    if mode == "make":
        make(file, base, getattr(torch, argv[3]))
        return {}
    geometry = json.loads(argv[3])
    if mode == "convert":
        spec = parse_variant("mem_convert", dict(base=base, pretrained={"file": str(file)}, **geometry))
        before = rss()
        reset_peak()
        report = convert_checkpoint(spec, argv[4])
        return dict(added=peak() - before, resampled=report.by_action("resampled"))
    if mode == "forward":
        name = timm_anysize.register_variant("mem_forward", base=base, **geometry)
        cost = make_plan(timm_anysize.get_variant(name)).cost
        before = rss()
        reset_peak()
        model = timm.create_model(name).eval()
        with torch.no_grad():
            model(torch.randn(1, *model.pretrained_cfg["input_size"]))
        return dict(added=peak() - before, estimate=cost.total, describe=cost.describe())
    timm_anysize.register_variant("mem_variant", base=base, pretrained={"file": str(file)}, **geometry)
    before = rss()
    reset_peak()
    model = timm.create_model("mem_variant", pretrained=True, features_only=mode == "features")
    added = peak() - before
    sd = model.state_dict()
    return dict(
        added=added,
        model_bytes=sum(t.numel() * t.element_size() for t in sd.values()),
        largest=max(t.numel() * t.element_size() for t in sd.values()),
        report=timm_anysize.adaptation_report(model).summary(),
    )


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
