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

``--peak``: the peak memory of a training step at each size, each path and size in its own fresh process: what one
SGD step, after a warm-up step, adds to the process's resident high-water mark (glibc set to return freed memory;
on CUDA the allocator's peak over the step; benchmarks/peak_memory.py).

    python benchmarks/bench_train_sizes.py [--tiny] [--reps N] [--only scheduled|naflex] [--peak] [--out results.json]

``--tiny`` is a smoke run: the first family row only, one round, a smaller NaFlex model (``--peak``: its own size only).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator, Optional

import timm
import torch
from peak_memory import CHILD_ENV, peak_mib
from timm.models import naflexvit

import timm_anysize
from timm_anysize.core.family import Family
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


def _rows(only: Optional[str] = None, first: bool = False) -> Iterator[tuple[Family, torch.nn.Module]]:
    """Each measured family (or the one named ``only``; the first one only with ``first``) and its tiny timm model
    at the tiny size: those with a cached dynamic path whose timm model has ``set_input_size``."""
    for fam in FAMILIES:
        if fam.dynamic != "cached" or fam.tiny is None or not fam.tiny.img_size_arg or only not in (None, fam.name):
            continue
        torch.manual_seed(0)
        base = timm.create_model(fam.example, img_size=fam.tiny.img_size, **fam.tiny.model_args)
        if hasattr(base, "set_input_size"):
            yield fam, base
            if first:
                return


def _ours(fam: Family, base: torch.nn.Module) -> torch.nn.Module:
    """The family's tiny model with the base's weights, made dynamic (one model for every size)."""
    assert fam.tiny is not None
    ours = timm.create_model(
        fam.example, img_size=fam.tiny.img_size, **fam.tiny.model_args, **fam.dynamic_kwargs(True, True)
    )
    ours.load_state_dict(base.state_dict())
    return timm_anysize.enable_dynamic(ours)


def _fixed(base: torch.nn.Module, size: int) -> Optional[torch.nn.Module]:
    """A copy of the base moved to ``size`` by timm's ``set_input_size``; None where timm cannot."""
    fixed = copy.deepcopy(base)
    try:
        fixed.set_input_size(img_size=size)
    except Exception:  # noqa: BLE001 - a model timm cannot move to this size: no reference
        return None
    return fixed


def bench_scheduled(reps: int, device: torch.device, tiny: bool = False) -> list[dict]:
    rows = []
    for fam, base in _rows(first=tiny):
        assert fam.tiny is not None
        tiny = fam.tiny
        ours = _ours(fam, base).to(device).train()
        for size in (tiny.img_size, 2 * tiny.img_size):
            moved = _fixed(base, size)
            if moved is None:
                continue
            fixed = moved.to(device).train()
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


def bench_naflex(reps: int, device: torch.device, tiny: bool = False) -> dict:
    args = dict(embed_dim=64, depth=1, num_heads=2) if tiny else dict(embed_dim=192, depth=4, num_heads=3)
    args["img_size"] = 64
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/bench_naflex_vit.pt"
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


def _peak_child(family: str, size: int, path: str, device: torch.device) -> Optional[float]:
    """In a fresh process: the MiB an SGD step of ``path`` (ours / fixed) at ``size`` adds to the peak, after a
    warm-up step (benchmarks/peak_memory.py)."""
    fam, base = next(_rows(family))  # only that family's model is built
    model = _ours(fam, base) if path == "ours" else _fixed(base, size)
    if model is None:
        return None
    model = model.to(device).train()
    del base
    x = torch.randn(8, 3, size, size, device=device)
    return peak_mib(_step(model, x, torch.optim.SGD(model.parameters(), lr=0.0)), device)[1]


def bench_peak(device: torch.device, tiny: bool = False) -> list[dict]:
    """Peak memory of a training step per family, size and path, each in a fresh process."""
    rows = []
    for fam, _ in _rows(first=tiny):
        assert fam.tiny is not None
        for size in (fam.tiny.img_size,) if tiny else (fam.tiny.img_size, 2 * fam.tiny.img_size):
            mib = {}
            for path in ("ours", "fixed"):
                cmd = [sys.executable, __file__, "--peak-child", fam.name, str(size), path, "--device", str(device)]
                done = subprocess.run(cmd, capture_output=True, text=True, env=CHILD_ENV)
                if done.returncode:
                    raise RuntimeError(f"{fam.name} {size}px {path}:\n{done.stderr[-3000:]}")
                mib[path] = json.loads(done.stdout.splitlines()[-1])
            if mib["fixed"] is None:
                continue
            rows.append(dict(family=fam.name, size=size, peak_mib_ours=mib["ours"], peak_mib_fixed=mib["fixed"]))
            print(
                f"{fam.name:16s} {size:4d}px  peak ours {mib['ours']:7.1f} MiB  fixed {mib['fixed']:7.1f} MiB",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a smoke run: one family, one round, a small NaFlex model")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds per path (the minimum is kept)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--only", choices=("scheduled", "naflex"), help="run one of the two benchmarks")
    parser.add_argument("--peak", action="store_true", help="peak memory per size instead, fresh process each")
    parser.add_argument("--device", help="cpu or cuda (default: cuda where there is one)")
    parser.add_argument("--peak-child", nargs=3, metavar=("FAMILY", "SIZE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.peak_child:
        family, size, path = args.peak_child
        print(json.dumps(_peak_child(family, int(size), path, device)))
        return
    reps = 1 if args.tiny else args.reps
    if args.peak:
        results: dict = dict(device=str(device), peak=bench_peak(device, args.tiny))
    else:
        results = dict(
            device=str(device),
            scheduled=bench_scheduled(reps, device, args.tiny) if args.only != "naflex" else [],
            naflex=bench_naflex(reps, device, args.tiny) if args.only != "scheduled" else {},
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
