"""Training at many sizes (issue 31, item 5): a dynamic model trained at each size against a timm model built for it,
and a variant's NaFlexVit (``use_naflex=True``) against timm's own NaFlexVit of the same dimensions, in one process.

Scheduled resolutions: for each family row whose timm model has ``set_input_size`` (a model built for a size, with
no dynamic code), ``ours`` is the family's tiny model made dynamic and run at each size, ``fixed`` a copy after
``set_input_size(img_size=s)``; one SGD step (forward, backward, update) is timed per path, interleaved, the minimum
over rounds; ``ratio`` is fixed/ours images/s (1.0: no cost of running at any size). Memory per size, on any
device: ``saved``, the activations each path keeps for its backward (the size-dependent part of a training step's
peak: the bytes of the distinct tensors autograd saves, counted with ``saved_tensors_hooks``), ours and fixed; on
CUDA also ``peak``, the allocator's peak of our step. NaFlex: tokens/s of a forward over a padded NaFlex batch,
ours against timm's, ``ratio`` the same.

    python benchmarks/bench_train_sizes.py [--reps N] [--only scheduled|naflex] [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Callable

import timm
import torch
from timm.models import naflexvit

import timm_anysize
from timm_anysize.families import FAMILIES


def _best_ms(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return min(times)


def _step(model: torch.nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer) -> Callable[[], None]:
    def run() -> None:
        opt.zero_grad()
        model(x).square().mean().backward()  # any head (EVA's tiny has none)
        opt.step()

    return run


def _saved_mib(model: torch.nn.Module, x: torch.Tensor) -> float:
    """MiB of the distinct tensors autograd saves for the backward of one forward (each storage counted once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x).square().mean()
    del out
    return sum(storages.values()) / 2**20


def bench_scheduled(reps: int, device: torch.device) -> list[dict]:
    rows = []
    for fam in FAMILIES:
        if fam.dynamic != "cached" or fam.tiny is None or not fam.tiny.img_size_arg:
            continue
        tiny = fam.tiny
        torch.manual_seed(0)
        base = timm.create_model(fam.example, img_size=tiny.img_size, **tiny.model_args)
        if not hasattr(base, "set_input_size"):
            continue
        ours = timm.create_model(
            fam.example, img_size=tiny.img_size, **tiny.model_args, **fam.dynamic_kwargs(True, True)
        )
        ours.load_state_dict(base.state_dict())
        ours = timm_anysize.enable_dynamic(ours).to(device).train()
        for size in (tiny.img_size, 2 * tiny.img_size):
            fixed = copy.deepcopy(base)
            try:
                fixed.set_input_size(img_size=size)
            except Exception:  # noqa: BLE001 - a model timm cannot move to this size: no reference
                continue
            fixed = fixed.to(device).train()
            x = torch.randn(8, 3, size, size, device=device)
            paths = {
                "ours": _step(ours, x, torch.optim.SGD(ours.parameters(), lr=0.0)),
                "fixed": _step(fixed, x, torch.optim.SGD(fixed.parameters(), lr=0.0)),
            }
            best: dict[str, list[float]] = {k: [] for k in paths}
            for r in range(reps):
                for k in list(paths)[r % 2 :] + list(paths)[: r % 2]:
                    best[k].append(_best_ms(paths[k], 1))
            saved = {k: _saved_mib(m, x) for k, m in (("ours", ours), ("fixed", fixed))}
            peak = "n/a"
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                paths["ours"]()
                peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
            ours_ms, fixed_ms = min(best["ours"]), min(best["fixed"])
            rows.append(
                dict(
                    family=fam.name,
                    size=size,
                    ours_img_s=8000 / ours_ms,
                    fixed_img_s=8000 / fixed_ms,
                    ratio=fixed_ms / ours_ms,
                    saved_mib_ours=round(saved["ours"], 2),
                    saved_mib_fixed=round(saved["fixed"], 2),
                    peak=peak,
                )
            )
            print(
                f"{fam.name:16s} {size:4d}px  ours {8000 / ours_ms:8.1f} img/s  fixed {8000 / fixed_ms:8.1f} img/s"
                f"  ratio {fixed_ms / ours_ms:.3f}  saved {saved['ours']:.1f} / {saved['fixed']:.1f} MiB  peak {peak}",
                flush=True,
            )
    return rows


def bench_naflex(reps: int, device: torch.device) -> dict:
    args = dict(embed_dim=192, depth=4, num_heads=3, img_size=64)
    torch.manual_seed(0)
    path = "/tmp/bench_naflex_vit.pt"
    torch.save(timm.create_model("vit_tiny_patch16_224", **args).state_dict(), path)
    name = timm_anysize.register_variant(
        "bench_naflex_vit",
        base="vit_tiny_patch16_224",
        model_args={k: v for k, v in args.items() if k != "img_size"},
        img_size=96,
        pretrained={"file": path, "img_size": 64},
    )
    ours = timm.create_model(name, pretrained=True, use_naflex=True).to(device).eval()
    # the same dimensions, position grid (96 px / 16) and interpolation as the variant's NaFlexVit
    keys = ("pos_embed_interp_mode", "pos_embed_antialias", "pos_embed_align_corners", "pos_embed_ar_preserving")
    pos = {k: getattr(ours.embeds, k) for k in keys if hasattr(ours.embeds, k)}
    theirs_args = dict(args, img_size=96, **pos)
    theirs = timm.create_model("vit_tiny_patch16_224", use_naflex=True, **theirs_args).to(device).eval()
    x = torch.randn(16, 3, 192, 128, device=device)
    patches, (gh, gw) = naflexvit.batch_patchify(x, (16, 16))
    n = gh * gw
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    coord = torch.stack([ys.flatten(), xs.flatten()], -1).expand(16, -1, -1).to(device)
    pad = 32
    batch = dict(
        patches=torch.cat([patches, patches.new_zeros(16, pad, patches.shape[-1])], 1),
        patch_coord=torch.cat([coord, coord.new_zeros(16, pad, 2)], 1),
        patch_valid=torch.cat([torch.ones(16, n, dtype=torch.bool), torch.zeros(16, pad, dtype=torch.bool)], 1).to(
            device
        ),
    )
    models = {"ours": ours, "theirs": theirs}
    best: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for r in range(reps):  # interleaved, alternating which runs first: a loaded machine slows both alike
            for k in list(models)[r % 2 :] + list(models)[: r % 2]:
                best[k].append(_best_ms(lambda m=models[k]: m(batch), 1))
    ms = {k: min(v) for k, v in best.items()}
    tokens = 16 * n
    row = dict(
        ours_tok_s=tokens * 1000 / ms["ours"], timm_tok_s=tokens * 1000 / ms["theirs"], ratio=ms["theirs"] / ms["ours"]
    )
    print(
        f"naflex vit_tiny dims  ours {row['ours_tok_s']:.0f} tok/s  timm {row['timm_tok_s']:.0f} tok/s"
        f"  ratio {row['ratio']:.3f}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="timed rounds per path (the minimum is kept)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--only", choices=("scheduled", "naflex"), help="run one of the two benchmarks")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = dict(
        device=str(device),
        scheduled=bench_scheduled(args.reps, device) if args.only != "naflex" else [],
        naflex=bench_naflex(args.reps, device) if args.only != "scheduled" else {},
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
