"""Calibration without labels (timm_anysize.calibrate) per family: images/s of a calibration step (the teacher's
forward at the source geometry, the student's forward and backward at the variant's) against a plain timm training
step of the same model at the variant's size (cross-entropy on labels, AdamW; a headless model's features: their
mean square), timed in the same run; and the peak memory of each (teacher + student, against the student's training
alone). Ratios < 1: calibration is slower, as it runs a teacher too. A calibration is timed as users call it: one
``calibrate`` call of ``--steps`` steps, its teacher's making and the held-aside agreement (one image) included.

Each measurement runs in its own fresh process: the timing (a warm-up step, then ``--steps`` timed), and the peak
memory of one step after a warm-up step (benchmarks/peak_memory.py: on the CPU what the step adds to the resident
high-water mark, glibc set to return freed memory; on CUDA the allocator's peak). For calibration the step is a
``calibrate`` call of one step: the teacher it makes, the teacher's forward and the student's training step.

    python benchmarks/bench_calibration.py [--tiny] [--family vit swin ...] [--device cuda] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from typing import Any

import timm
import torch
from peak_memory import CHILD_ENV, peak_mib
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


def child(case: tuple, kind: str, measure: str, batch: int, steps: int, device: torch.device) -> dict[str, Any]:
    """One measurement in this (fresh) process: a calibration or a plain training run of ``case``; ``measure``
    ``time`` (a warm-up step, then ``steps`` timed) or ``peak`` (one step, after a warm-up step)."""
    _, arch, args, source, variant = case
    folder = tempfile.mkdtemp()
    torch.manual_seed(0)
    save_file(timm.create_model(arch, img_size=source, **args).state_dict(), f"{folder}/w.safetensors")
    name = timm_anysize.register_variant(
        "bench_calibration_variant",
        base=arch,
        model_args=args,
        pretrained={"file": f"{folder}/w.safetensors", "img_size": source},
        **variant,
    )
    if kind == "calibrate":
        model = timm.create_model(name, pretrained=True).to(device)
        c, h, w = model.pretrained_cfg["input_size"]
        images = torch.rand(batch * 4, c, h, w)

        def run(n: int) -> None:
            timm_anysize.calibrate(model, images, steps=n, batch_size=batch, held_out=1, progress=False)

    else:
        c, h, w = timm.get_pretrained_cfg(name).input_size  # the variant's size; plain timm built for it
        plain = timm.create_model(
            arch, img_size=(h, w), **args, **{k: v for k, v in variant.items() if k != "img_size"}
        ).to(device)
        opt = torch.optim.AdamW(plain.parameters(), lr=1e-4)
        x = torch.rand(batch, c, h, w, device=device)
        y = torch.randint(0, max(plain.num_classes, 1), (batch,), device=device)

        def loss_of(out: torch.Tensor) -> torch.Tensor:  # a headless model (EVA-02's MIM weights): its features
            return torch.nn.functional.cross_entropy(out, y) if plain.num_classes else out.square().mean()

        def run(n: int) -> None:
            for _ in range(n):
                loss = loss_of(plain(x))
                opt.zero_grad()
                loss.backward()
                opt.step()

    if measure == "peak":  # for calibration: the teacher it makes, its forward, the student's step
        return {"size": [h, w], "peak_mb": peak_mib(lambda: run(1), device)[1]}
    run(1)  # warm-up (for calibration: the teacher's making too)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    run(steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"size": [h, w], "images_per_s": batch * steps / (time.perf_counter() - t0)}


def bench_case(index: int, tiny: bool, batch: int, steps: int, device: str) -> dict[str, Any]:
    """Both measurements of case ``index``, each in a fresh process."""
    out = {}
    for kind in ("train", "calibrate"):
        for measure in ("time", "peak"):  # peak: glibc set to hand freed memory back (peak_memory.CHILD_ENV)
            cmd = [sys.executable, __file__, "--child", str(index), kind, measure, "--batch", str(batch)]
            cmd += ["--steps", str(steps), "--device", device] + (["--tiny"] if tiny else [])
            done = subprocess.run(cmd, capture_output=True, text=True, env=CHILD_ENV if measure == "peak" else None)
            if done.returncode:
                raise RuntimeError(f"{kind} ({measure}) of case {index} failed:\n{done.stderr[-3000:]}")
            out.setdefault(kind, {}).update(json.loads(done.stdout.splitlines()[-1]))
    calib, train = out["calibrate"], out["train"]
    return {
        "size": calib["size"],
        "calibration_images_per_s": calib["images_per_s"],
        "training_images_per_s": train["images_per_s"],
        "ratio": calib["images_per_s"] / train["images_per_s"],
        "calibration_peak_mb": calib["peak_mb"],
        "training_peak_mb": train["peak_mb"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="one tiny case, one step (a smoke run)")
    parser.add_argument("--family", nargs="+", help="only these cases (default: all)")
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--steps", type=int, default=5, help="steps timed per measurement")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (peak: the CUDA allocator's there)")
    parser.add_argument("--out", help="write the results as JSON")
    parser.add_argument("--child", nargs=3, metavar=("CASE", "KIND", "MEASURE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = TINY_CASES if args.tiny else CASES
    batch, steps = (2, 1) if args.tiny else (args.batch, args.steps)
    if args.child:
        index, kind, measure = args.child
        print(json.dumps(child(cases[int(index)], kind, measure, batch, steps, torch.device(args.device))))
        return
    head = (
        f"{'family':<8} {'arch':<30} {'size':>9} {'calib img/s':>12} {'train img/s':>12} {'ratio':>6} {'peak MB':>14}"
    )
    print(head)
    print("-" * len(head))
    results = {}
    for index, (family, arch, *_) in enumerate(cases):
        if args.family and family not in args.family:
            continue
        row = results[family] = bench_case(index, args.tiny, batch, steps, args.device)
        print(
            f"{family:<8} {arch:<30} {'x'.join(map(str, row['size'])):>9} {row['calibration_images_per_s']:>12.1f} "
            f"{row['training_images_per_s']:>12.1f} {row['ratio']:>6.2f} "
            f"{row['calibration_peak_mb']:>6.0f} / {row['training_peak_mb']:<6.0f}",
            flush=True,
        )
    print(
        f"batch {batch}, {steps} steps on {args.device}, each measurement in a fresh process; ratio: calibration "
        "images/s over a plain training step's; peak MB: calibration (teacher + student) / plain training"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
