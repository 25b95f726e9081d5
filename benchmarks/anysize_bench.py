"""Benchmarks: dynamic-size forward throughput and pretrained loading, each against timm measured in the same run.

Throughput: for each (model, batch, input size), our dynamic model is timed interleaved with (a) a timm model built
for that size (the limit), (b) timm's ``dynamic_img_size=True`` and (c) Hugging Face ``ViTModel`` with
``interpolate_pos_encoding=True`` (same dimensions, random weights; skipped if transformers is missing). Ratios are
throughput relative to (a) and (b), so > 1 is faster.

Loading: ``timm.create_model(variant, pretrained=True)`` (adaptation included) against plain timm loading the
same file into the base at its native geometry, each in a fresh subprocess: wall time and peak resident memory.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_anysize.dynamic import enable_dynamic

__all__ = ["bench_forward", "bench_load", "run_bench"]

FULL_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (128, 128), (96, 160), (200, 200), (224, 224), (448, 448))
TINY_SIZES: tuple[tuple[int, int], ...] = ((32, 32), (48, 80), (70, 70))


@dataclass
class ForwardResult:
    model: str
    batch: int
    size: tuple[int, int]
    ms: dict[str, float]  # best (minimum over repeats) ms per forward: ours, fixed, timm_dynamic, hf

    def ratios(self) -> dict[str, float]:
        """Our throughput relative to each other path (> 1: we are faster)."""
        return {k: v / self.ms["ours"] for k, v in self.ms.items() if k != "ours"}


def _padded(size: tuple[int, int], patch: int) -> tuple[int, int]:
    return tuple(-(-s // patch) * patch for s in size)  # type: ignore[return-value]


def _hf_vit(model: nn.Module) -> Optional[nn.Module]:
    try:
        from transformers import ViTConfig, ViTModel
    except ImportError:
        return None
    cfg = ViTConfig(
        hidden_size=model.embed_dim,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=model.blocks[0].attn.num_heads,
        intermediate_size=model.blocks[0].mlp.fc1.out_features,
        image_size=model.patch_embed.img_size[0],
        patch_size=model.patch_embed.patch_size[0],
        num_channels=3,
    )
    return ViTModel(cfg, add_pooling_layer=False).eval()


def _time(fn: Callable[[], object], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1000


@torch.no_grad()
def bench_forward(
    arch: str, batch: int, size: tuple[int, int], reps: int, seconds: float = 0.3, with_hf: bool = True
) -> ForwardResult:
    """Time one (arch, batch, size) cell: all paths interleaved, ``reps`` rounds of about ``seconds`` each.

    Each path's time is the minimum over rounds (the least-disturbed estimate on a shared machine); the order of
    the paths rotates every round.
    """
    torch.manual_seed(0)
    native = timm.create_model(arch).eval()
    patch = native.patch_embed.patch_size[0]
    padded = _padded(size, patch)
    ours = enable_dynamic(timm.create_model(arch, dynamic_img_size=True, dynamic_img_pad=True).eval())
    ours.load_state_dict(native.state_dict())
    fixed = timm.create_model(arch, img_size=padded).eval()  # the limit: a model built for (the padded) size
    timm_dyn = timm.create_model(arch, dynamic_img_size=True, dynamic_img_pad=True).eval()
    x = torch.randn(batch, 3, *size)
    x_fixed = F.pad(x, (0, padded[1] - size[1], 0, padded[0] - size[0]))
    paths: dict[str, Callable[[], object]] = {
        "ours": lambda: ours(x),
        "fixed": lambda: fixed(x_fixed),
        "timm_dynamic": lambda: timm_dyn(x),
    }
    hf = _hf_vit(native) if with_hf else None
    if hf is not None:
        paths["hf"] = lambda: hf(pixel_values=x_fixed, interpolate_pos_encoding=True)
    for fn in paths.values():  # warm-up (and fills our cache, as in steady-state inference)
        fn()
    single_s = _time(paths["fixed"], 1) / 1000
    iters = max(1, round(seconds / single_s))
    reps = min(reps, 3) if single_s > 1.0 else reps  # multi-second forwards: 3 interleaved rounds suffice
    times: dict[str, list[float]] = {k: [] for k in paths}
    order = list(paths)
    for r in range(reps):
        for k in order[r % len(order) :] + order[: r % len(order)]:  # rotate who goes first
            times[k].append(_time(paths[k], iters))
    return ForwardResult(arch, batch, size, {k: min(v) for k, v in times.items()})


@torch.no_grad()
def bench_overhead(arch: str, size: tuple[int, int], n: int = 500, reps: int = 7) -> dict[str, float]:
    """Microseconds per call of the geometry-dependent steps (patch embedding + position embedding), minimum over
    ``reps`` rounds of ``n`` calls: ours, a fixed-size timm model, timm's dynamic path. Whole forwards on a shared
    2-core machine vary by several percent run to run; this isolates what dynamic sizing itself costs."""
    torch.manual_seed(0)
    ours = enable_dynamic(timm.create_model(arch, dynamic_img_size=True, dynamic_img_pad=True).eval())
    fixed = timm.create_model(arch, img_size=_padded(size, ours.patch_embed.patch_size[0])).eval()
    timm_dyn = timm.create_model(arch, dynamic_img_size=True, dynamic_img_pad=True).eval()
    x = torch.randn(1, 3, *size)
    x_fixed = F.pad(x, (0, fixed.patch_embed.img_size[1] - size[1], 0, fixed.patch_embed.img_size[0] - size[0]))
    paths = {
        "ours": lambda: ours._pos_embed(ours.patch_embed(x)),
        "fixed": lambda: fixed._pos_embed(fixed.patch_embed(x_fixed)),
        "timm_dynamic": lambda: timm_dyn._pos_embed(timm_dyn.patch_embed(x)),
    }
    for fn in paths.values():
        fn()
    best = {k: float("inf") for k in paths}
    for _ in range(reps):
        for k, fn in paths.items():
            best[k] = min(best[k], _time(fn, n) * 1000)
    return best


_LOAD_SCRIPT = r"""
import json, os, sys, threading, time
import timm, torch
mode, name, path = sys.argv[1:4]
if mode == "ours":
    import timm_anysize
    timm_anysize.register_yaml(sys.argv[4])
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
peak, done = [rss()], threading.Event()
def sample():  # the resident-set peak *during* the load (ru_maxrss would include import-time peaks)
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
before = rss()
t = threading.Thread(target=sample); t.start()
start = time.perf_counter()
if mode == "ours":
    m = timm.create_model(name, pretrained=True)
else:
    m = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))
seconds = time.perf_counter() - start
done.set(); t.join()
print(json.dumps({"seconds": seconds, "peak_mb": (max(peak[0], rss()) - before) / 2**20}))
"""


def _run_load(args: list[str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_load(arch: str, suffix: str, target: dict, reps: int, workdir: Path) -> dict[str, float]:
    """Median wall time and peak RSS increase of loading ``arch`` weights: ours (adapted to ``target``) vs timm."""
    import safetensors.torch

    model = timm.create_model(arch)
    path = workdir / f"{arch}{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    weights_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    largest_mb = max(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    del model
    name = f"bench_{arch}_{suffix[1:]}"
    yaml_path = workdir / f"{name}.yaml"
    geometry = "".join(f"    {k}: {v}\n" for k, v in target.items())
    yaml_path.write_text(f"variants:\n  {name}:\n    base: {arch}\n{geometry}    pretrained: {{file: {path}}}\n")
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "timm": []}
    for _ in range(reps):
        runs["ours"].append(_run_load(["ours", name, str(path), str(yaml_path)]))
        runs["timm"].append(_run_load(["timm", arch, str(path)]))
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "peak_mb")} for k, v in runs.items()}
    return {
        "arch": arch,
        "format": suffix,
        "target": target,
        "weights_mb": weights_mb,
        "largest_tensor_mb": largest_mb,
        "ours_s": med["ours"]["seconds"],
        "timm_s": med["timm"]["seconds"],
        "ours_peak_mb": med["ours"]["peak_mb"],
        "timm_peak_mb": med["timm"]["peak_mb"],
    }


def run_bench(
    tiny: bool = False,
    archs: Optional[Sequence[str]] = None,
    batches: Sequence[int] = (1, 32),
    sizes: Optional[Sequence[tuple[int, int]]] = None,
    reps: int = 7,
    load: bool = True,
    forward: bool = True,
    out: Optional[Path] = None,
    print_fn: Callable[[str], None] = print,
) -> dict:
    """Run the forward (and loading) benchmarks, print the ratio tables, and optionally write JSON.

    Args:
        tiny: A smoke run (``test_vit``, batch 1, three small sizes, one repetition, a tiny load check).
        archs: timm architectures (default ViT-Ti and ViT-S).
        batches: Batch sizes.
        sizes: Input sizes (H, W); the default includes a non-square and a non-divisible size.
        reps: Interleaved repetitions per cell (the minimum is reported).
        load: Also benchmark loading.
        forward: Benchmark whole forwards (the per-call cost table always runs).
        out: JSON output path.
        print_fn: Where the tables go.

    Returns:
        All measurements.
    """
    if tiny:
        archs, batches, sizes, reps = ["test_vit"], [1], TINY_SIZES, 1
    archs = list(archs or ["vit_tiny_patch16_224", "vit_small_patch16_224"])
    sizes = list(sizes or FULL_SIZES)
    results: dict = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}",
        "forward": [],
        "load": [],
    }
    head = f"{'model':<22} {'batch':>5} {'size':>9} {'ours ms':>9} {'vs fixed':>9} {'vs timm dyn':>11} {'vs HF':>7}"
    print_fn(head)
    print_fn("-" * len(head))
    for arch in archs if forward else ():
        for batch in batches:
            for size in sizes:
                r = bench_forward(arch, batch, size, reps, seconds=0.01 if tiny else 0.3, with_hf=not tiny)
                ratios = r.ratios()
                results["forward"].append(
                    {"model": arch, "batch": batch, "size": list(size), "ms": r.ms, "ratios": ratios}
                )
                hf = f"{ratios['hf']:7.2f}" if "hf" in ratios else f"{'-':>7}"
                print_fn(
                    f"{arch:<22} {batch:>5} {size[0]:>4}x{size[1]:<4} {r.ms['ours']:>9.2f} "
                    f"{ratios['fixed']:>9.3f} {ratios['timm_dynamic']:>11.3f} {hf}"
                )
    print_fn("ratios: our throughput / theirs (> 1: faster); 'fixed' is a timm model built for that (padded) size")
    print_fn("")
    head = f"{'per-call cost (us)':<22} {'size':>9} {'ours':>8} {'fixed':>8} {'timm dyn':>9}"
    print_fn(head)
    print_fn("-" * len(head))
    for arch in archs:
        for size in sizes[:3] if tiny else sizes:
            us = bench_overhead(arch, size, n=20 if tiny else 200, reps=1 if tiny else 7)
            results.setdefault("overhead_us", []).append({"model": arch, "size": list(size), "us": us})
            print_fn(
                f"{arch:<22} {size[0]:>4}x{size[1]:<4} {us['ours']:>8.1f} {us['fixed']:>8.1f} "
                f"{us['timm_dynamic']:>9.1f}"
            )
    print_fn("per-call cost: patch embedding + position embedding of one image (batch 1), minimum over repeats")
    if load:
        load_cases = (
            [("test_vit", ".safetensors", {"img_size": 96})]
            if tiny
            else [
                (arch, suffix, {"img_size": 384, "patch_size": 8})
                for arch in ("vit_small_patch16_224", "vit_base_patch16_224")
                for suffix in (".safetensors", ".pth")
            ]
        )
        print_fn("")
        head = f"{'loading':<22} {'format':<12} {'ours s':>7} {'timm s':>7} {'time x':>7} {'ours MB':>8} {'timm MB':>8} {'mem x':>6}"
        print_fn(head)
        print_fn("-" * len(head))
        with tempfile.TemporaryDirectory() as tmp:
            for arch, suffix, target in load_cases:
                r = bench_load(arch, suffix, target, 1 if tiny else 3, Path(tmp))
                results["load"].append(r)
                print_fn(
                    f"{arch:<22} {suffix:<12} {r['ours_s']:>7.2f} {r['timm_s']:>7.2f} "
                    f"{r['ours_s'] / r['timm_s']:>7.2f} {r['ours_peak_mb']:>8.0f} {r['timm_peak_mb']:>8.0f} "
                    f"{r['ours_peak_mb'] / max(r['timm_peak_mb'], 1e-9):>6.2f}"
                )
        print_fn(
            "loading: ours adapts to the target geometry (pos-embed resampled, kernel PI-resized); timm loads "
            "the same file at the native geometry; peak MB is the rise in resident memory during the load "
            "(sampled every ms); 'weights' is the checkpoint size, the largest tensor is listed in the JSON"
        )
    if out is not None:
        Path(out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":  # pragma: no cover
    run_bench(tiny=os.environ.get("BENCH_TINY") == "1")
