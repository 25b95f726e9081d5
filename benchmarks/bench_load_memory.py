"""Peak memory and time of loading re-sized variants of large ViTs, against plain timm loading the same file.

Each checkpoint is generated on disk by this script with random values (never committed), one tensor at a time.
Every measurement runs in a fresh child process: the peak resident memory (``VmHWM``, reset after the imports and
the variant's plan) minus the resident memory before the load, so only what loading adds is counted.

    python benchmarks/bench_load_memory.py                       # ViT-L/16 and ViT-g/14 (DINOv2), bfloat16
    python benchmarks/bench_load_memory.py --models vit_7b --forward --convert   # the 7B DINOv3 (13.4 GB)
    python benchmarks/bench_load_memory.py --models vit_b --dtype float32       # a quick run

The bound checked is the one the loader promises: at most 1.1x the model's bytes plus its largest tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODELS = {
    # name: (timm base, variant geometry)
    "vit_b": ("vit_base_patch16_224", dict(img_size=518, patch_size=14, in_chans=4)),
    "vit_l": ("vit_large_patch16_224", dict(img_size=518, patch_size=14, in_chans=4)),
    "vit_g": ("vit_giant_patch14_dinov2", dict(img_size=512, patch_size=16, in_chans=4)),
    "vit_7b": ("vit_7b_patch16_dinov3", dict(img_size=518, patch_size=14, in_chans=4)),
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set size (VmHWM) to the current
        f.write("5")


def _peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def generate(base: str, dtype: torch.dtype, path: Path) -> None:
    """A random checkpoint of ``base`` in ``dtype``, written tensor by tensor (never the whole model in memory)."""
    import timm

    from timm_anysize.core.meta import meta_device
    from timm_anysize.core.safetensors_io import write_safetensors

    with meta_device():
        shapes = {k: (v.shape, v.dtype) for k, v in timm.create_model(base).state_dict().items()}
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for key, (shape, dt) in shapes.items():
            if dt.is_floating_point:
                yield key, (torch.randn(shape, generator=gen) * 0.02).to(dtype)
            else:
                yield key, torch.zeros(shape, dtype=dt)

    entries = [(k, dtype if dt.is_floating_point else dt, tuple(s)) for k, (s, dt) in shapes.items()]
    write_safetensors(path, entries, tensors())


def child(mode: str, base: str, geometry: dict, file: str, dtype_name: str, forward: bool, out: str) -> dict:
    """One measurement, in this (fresh) process."""
    import timm

    import timm_anysize

    dtype = DTYPES[dtype_name]
    torch.set_num_threads(os.cpu_count() or 1)
    result: dict = {"mode": mode}
    if mode == "anysize":
        name = f"bench_{base}"
        timm_anysize.register_variant(name, base=base, pretrained={"file": file}, **geometry)  # planned here (meta)
        before = _rss()
        _reset_peak()
        t0 = time.perf_counter()
        model = timm.create_model(name, pretrained=True, dtype=dtype)
    elif mode == "timm":
        before = _rss()
        _reset_peak()
        t0 = time.perf_counter()
        model = timm.create_model(base, pretrained=True, pretrained_cfg_overlay=dict(file=file), dtype=dtype)
    elif mode == "convert":
        from timm_anysize.convert import convert_checkpoint
        from timm_anysize.core.spec import parse_variant

        spec = parse_variant("bench_convert", dict(base=base, pretrained={"file": file}, **geometry))
        before = _rss()
        _reset_peak()
        t0 = time.perf_counter()
        convert_checkpoint(spec, out)
        result.update(seconds=time.perf_counter() - t0, added=_peak() - before)
        return result
    else:
        raise ValueError(mode)
    result["seconds"] = time.perf_counter() - t0
    result["added"] = _peak() - before
    sd = model.state_dict()
    result["model_bytes"] = sum(t.numel() * t.element_size() for t in sd.values())
    result["largest"] = max(t.numel() * t.element_size() for t in sd.values())
    result["dtype"] = str(next(model.parameters()).dtype)
    if forward:
        size = geometry["img_size"] if mode == "anysize" else model.pretrained_cfg["input_size"][1]
        chans = geometry["in_chans"] if mode == "anysize" else 3
        x = torch.randn(1, chans, size, size, dtype=dtype)
        t0 = time.perf_counter()
        with torch.inference_mode():
            y = model.eval()(x)
        result["forward_seconds"] = time.perf_counter() - t0
        result["forward_finite"] = bool(torch.isfinite(y.float()).all())
        result["peak_with_forward"] = _peak() - before
    return result


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    folder = Path(args.folder or tempfile.mkdtemp(prefix="anysize-loadmem-"))
    for key in args.models:
        base, geometry = MODELS[key]
        file = folder / f"{base}_{args.dtype}.safetensors"
        if not file.exists():
            t0 = time.perf_counter()
            generate(base, DTYPES[args.dtype], file)
            print(
                f"# generated {file.name} ({file.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s"
            )
        modes = (
            ["anysize"] + ([] if args.no_timm or key == "vit_7b" else ["timm"]) + (["convert"] if args.convert else [])
        )
        for mode in modes:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                base,
                json.dumps(geometry),
                str(file),
                args.dtype,
                str(bool(args.forward and mode == "anysize")),
                str(folder / f"{key}_converted.safetensors"),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                rows.append(dict(model=key, mode=mode, error=done.stderr.strip().splitlines()[-1]))
                continue
            row = dict(model=key, base=base, file_bytes=file.stat().st_size, **json.loads(done.stdout.splitlines()[-1]))
            rows.append(row)
            print(_format(row), flush=True)
        if not args.keep:
            for p in (file, folder / f"{key}_converted.safetensors"):
                p.unlink(missing_ok=True)
    return rows


def _format(row: dict) -> str:
    gib = 2**30
    if row["mode"] == "convert":
        return (
            f"{row['model']:7s} convert  added {row['added'] / gib:6.2f} GiB "
            f"({row['added'] / row['file_bytes']:.2f}x the file)  {row['seconds']:6.1f} s"
        )
    bound = 1.1 * row["model_bytes"] + row["largest"]
    text = (
        f"{row['model']:7s} {row['mode']:8s} {row['dtype']:15s} model {row['model_bytes'] / gib:6.2f} GiB  "
        f"added {row['added'] / gib:6.2f} GiB = {row['added'] / row['model_bytes']:.2f}x  "
        f"(bound {bound / gib:.2f} GiB: {'ok' if row['added'] <= bound else 'OVER'})  {row['seconds']:6.1f} s"
    )
    if "forward_seconds" in row:
        text += f"  forward {row['forward_seconds']:.1f} s (finite {row['forward_finite']})"
    return text


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, base, geometry, file, dtype, forward, out = sys.argv[2:9]
        print(json.dumps(child(mode, base, json.loads(geometry), file, dtype, forward == "True", out)))
        sys.exit(0)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vit_l", "vit_g"], choices=sorted(MODELS))
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--forward", action="store_true", help="one forward at batch 1 after loading (anysize)")
    p.add_argument("--convert", action="store_true", help="also measure the streaming convert of each file")
    p.add_argument("--no-timm", action="store_true", help="skip plain timm")
    p.add_argument("--folder", help="where the generated checkpoints go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--out", help="write the rows as JSON")
    args = p.parse_args()
    rows = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
