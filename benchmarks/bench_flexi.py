"""Run-time patch size: a flexi model at patch p against a timm model built for p, in one process.

``ours`` is one model (built at patch 16) run at patch p with ``timm_anysize.set_patch_size`` (kernel PI-resized
once and cached, position embedding resampled once per grid and cached); ``fixed`` is a copy after timm's
``set_input_size(patch_size=p)`` -- the limit: a timm model built for p with no flexi code. The paths are timed
interleaved (order rotated every round); each time is the minimum over rounds. See BENCHMARKS.md for a recorded run.

    python benchmarks/bench_flexi.py [--tiny] [--reps N] [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from typing import Callable

import timm
import torch

import timm_anysize


def _time(fn: Callable[[], object], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1000


@torch.no_grad()
def bench_patch(arch: str, batch: int, size: int, patch: int, reps: int, seconds: float = 0.3, **kwargs) -> dict:
    """Time one (arch, batch, size, patch) cell; returns milliseconds per forward and the ratio fixed/ours."""
    torch.manual_seed(0)
    base = timm.create_model(arch, img_size=size, **kwargs).eval()
    fixed = copy.deepcopy(base)
    fixed.set_input_size(img_size=size, patch_size=patch)
    ours = timm_anysize.set_patch_size(base, patch)
    x = torch.randn(batch, 3, size, size)
    paths = {"ours": lambda: ours(x), "fixed": lambda: fixed(x)}
    assert torch.allclose(paths["ours"](), paths["fixed"](), rtol=1e-4, atol=1e-4)  # same function, then timing
    single_s = _time(paths["fixed"], 1) / 1000
    iters = max(1, round(seconds / max(single_s, 1e-6)))
    times: dict[str, list[float]] = {k: [] for k in paths}
    order = list(paths)
    for r in range(reps):
        for k in order[r % 2 :] + order[: r % 2]:
            times[k].append(_time(paths[k], iters))
    best = {k: min(v) for k, v in times.items()}
    return dict(
        arch=arch,
        batch=batch,
        size=size,
        patch=patch,
        own_patch=int(base.patch_embed.patch_size[0]),
        ours_ms=best["ours"],
        fixed_ms=best["fixed"],
        ratio=best["fixed"] / best["ours"],
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="one small model, two cells (a smoke test)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", help="write the rows as JSON")
    args = parser.parse_args(argv)
    if args.tiny:
        cells = [("test_vit", b, 32, p, {"patch_size": 8}) for b in (1,) for p in (4, 16)]
        reps = 2
    else:
        cells = [("vit_tiny_patch16_224", 1, 224, p, {}) for p in (8, 14, 16, 28, 32)]
        cells += [("vit_tiny_patch16_224", 8, 224, p, {}) for p in (16, 32)]
        reps = args.reps
    rows = []
    print(f"{'model':24s} {'batch':>5s} {'size':>5s} {'patch':>5s} {'ours ms':>9s} {'fixed ms':>9s} {'vs fixed':>9s}")
    print("-" * 72)
    for arch, batch, size, patch, kwargs in cells:
        row = bench_patch(arch, batch, size, patch, reps, **kwargs)
        rows.append(row)
        star = "*" if patch == row["own_patch"] else " "
        print(
            f"{arch:24s} {batch:5d} {size:5d} {patch:4d}{star} {row['ours_ms']:9.2f} {row['fixed_ms']:9.2f} "
            f"{row['ratio']:9.3f}",
            flush=True,
        )
    print("ratio: our throughput / a timm model built for that patch (> 1: faster); * the model's own patch")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
