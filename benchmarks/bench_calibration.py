"""Calibration without labels (timm_anysize.calibrate) per family: images/s of a calibration step (the teacher's
forward at the source geometry, the student's forward and backward at the variant's) against a plain timm training
step of the same model at the variant's size (cross-entropy on labels, AdamW), timed in the same run; and the peak
memory each adds (teacher + student, against the student's training alone). Ratios < 1: calibration is slower, as
it runs a teacher too.

    python benchmarks/bench_calibration.py [--tiny] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any, Callable

import timm
import torch
from safetensors.torch import save_file

import timm_anysize

# (family, arch, model args, weights' size, variant's size and patch)
CASES: tuple[tuple[str, str, dict[str, Any], int, dict[str, Any]], ...] = (
    ("vit", "vit_small_patch16_224", dict(depth=6), 224, dict(img_size=320)),
    ("vit p8", "vit_small_patch16_224", dict(depth=6), 224, dict(img_size=224, patch_size=8)),
    ("deit", "deit_small_patch16_224", dict(depth=6), 224, dict(img_size=160)),
    ("beit", "beit_base_patch16_224", dict(depth=4), 224, dict(img_size=320)),
    ("swin", "swin_tiny_patch4_window7_224", dict(depths=(2, 2, 2, 2)), 224, dict(img_size=320)),
    ("eva", "eva02_tiny_patch14_224", dict(depth=6), 224, dict(img_size=308)),
)
TINY_CASES = (("vit", "vit_tiny_patch16_224", dict(depth=1, embed_dim=64, num_heads=2), 64, dict(img_size=96)),)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_added(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn``; what it added to the peak resident memory (Linux: VmHWM reset first), and its result."""
    before = _rss()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    out = fn()
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return out, max(0, peak - before)


def bench_case(arch: str, args: dict[str, Any], source: int, variant: dict[str, Any], batch: int, steps: int) -> dict:
    folder = tempfile.mkdtemp()
    torch.manual_seed(0)
    save_file(timm.create_model(arch, img_size=source, **args).state_dict(), f"{folder}/w.safetensors")
    name = timm_anysize.register_variant(
        f"bench_calibration_{arch}_{len(timm_anysize.list_variants())}",
        base=arch,
        model_args=args,
        pretrained={"file": f"{folder}/w.safetensors", "img_size": source},
        **variant,
    )
    model = timm.create_model(name, pretrained=True)
    c, h, w = model.pretrained_cfg["input_size"]
    images = torch.rand(batch * 4, c, h, w)
    timm_anysize.calibrate(model, images, steps=1, batch_size=batch, held_out=1, progress=False)  # warm-up, teacher

    def calibrate() -> float:
        t0 = time.perf_counter()
        timm_anysize.calibrate(model, images, steps=steps, batch_size=batch, held_out=1, progress=False)
        return time.perf_counter() - t0

    plain = timm.create_model(arch, img_size=(h, w), **args, **{k: v for k, v in variant.items() if k != "img_size"})
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-4)
    x, y = torch.rand(batch, c, h, w), torch.randint(0, plain.num_classes, (batch,))

    def train() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(plain(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - t0

    train()  # warm-up
    seconds_train, peak_train = _peak_added(train)
    seconds_calib, peak_calib = _peak_added(calibrate)
    return {
        "size": [h, w],
        "calibration_images_per_s": batch * steps / seconds_calib,
        "training_images_per_s": batch * steps / seconds_train,
        "ratio": seconds_train / seconds_calib,
        "calibration_peak_mb": peak_calib / 2**20,
        "training_peak_mb": peak_train / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="one tiny case, one step (a smoke run)")
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--steps", type=int, default=5, help="steps timed per measurement")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()
    cases = TINY_CASES if args.tiny else CASES
    batch, steps = (2, 1) if args.tiny else (args.batch, args.steps)
    head = (
        f"{'family':<8} {'arch':<30} {'size':>9} {'calib img/s':>12} {'train img/s':>12} {'ratio':>6} {'peak MB':>14}"
    )
    print(head)
    print("-" * len(head))
    results = {}
    for family, arch, model_args, source, variant in cases:
        row = results[family] = bench_case(arch, model_args, source, variant, batch, steps)
        print(
            f"{family:<8} {arch:<30} {'x'.join(map(str, row['size'])):>9} {row['calibration_images_per_s']:>12.1f} "
            f"{row['training_images_per_s']:>12.1f} {row['ratio']:>6.2f} "
            f"{row['calibration_peak_mb']:>6.0f} / {row['training_peak_mb']:<6.0f}"
        )
    print(
        f"batch {batch}, {steps} steps; ratio: calibration images/s over a plain training step's; peak MB added: "
        "calibration (teacher + student) / plain training"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
