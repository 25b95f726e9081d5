"""Per-family benchmark of the dynamic forward: timm-anysize's any-size model against a timm model built for each
size (the limit: no dynamic code at all), timed interleaved in the same run; ratios > 1 mean we are faster.

The own-size column is the cost of being dynamic where nothing changes; the other sizes include what each family
computes once per size (resampled embeddings, bias tables, Swin masks) being served from the cache.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import timm
import torch
from anysize_bench import _time

from timm_anysize.dynamic import enable_dynamic

__all__ = ["FAMILY_CASES", "bench_family", "run_family_bench"]

_SWIN = dict(embed_dim=96, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24))
# (family, arch, model args, own size, other sizes): each model as timm ships it except for depth, at sizes every
# fixed-size timm model can be built for (Swin: whole windows in every stage, so timm's path is right there).
FAMILY_CASES: tuple[tuple[str, str, dict[str, Any], int, tuple[tuple[int, int], ...]], ...] = (
    ("swin", "swin_tiny_patch4_window7_224", _SWIN, 224, ((448, 448), (224, 448))),
    ("beit", "beit_base_patch16_224", dict(depth=4), 224, ((320, 320), (224, 384))),
    ("cait", "cait_xxs24_224", dict(depth=4), 224, ((320, 320), (224, 384))),
    ("pit", "pit_ti_224", {}, 224, ((320, 320), (224, 384))),
    ("levit", "levit_128s", {}, 224, ((320, 320), (224, 384))),
    ("hiera", "hiera_tiny_224", {}, 224, ((320, 320), (224, 384))),
    ("mvitv2", "mvitv2_tiny", {}, 224, ((320, 320),)),
)
TINY_CASES = (
    (
        "swin",
        "swin_tiny_patch4_window7_224",
        dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
        112,
        ((224, 224),),
    ),
    ("beit", "beit_base_patch16_224", dict(embed_dim=64, depth=1, num_heads=2), 64, ((96, 96),)),
)


@torch.no_grad()
def bench_family(
    arch: str,
    args: dict[str, Any],
    own: int,
    sizes: Sequence[tuple[int, int]],
    batch: int,
    reps: int,
    seconds: float = 0.3,
) -> list[dict[str, Any]]:
    """Time ours against a timm model built for each size (own size first), interleaved; minimum over rounds."""
    torch.manual_seed(0)
    dyn_kwargs = {"dynamic_img_size": True} if arch.startswith("swin") else {}
    ours = enable_dynamic(timm.create_model(arch, img_size=own, **args, **dyn_kwargs).eval())
    rows = []
    for size in [(own, own), *sizes]:
        fixed = timm.create_model(arch, img_size=size, **args).eval()
        x = torch.randn(batch, 3, *size)
        paths: dict[str, Callable[[], object]] = {
            "ours": lambda x=x: ours(x),
            "fixed": lambda x=x, fixed=fixed: fixed(x),
        }
        for fn in paths.values():
            fn()  # warm-up (fills our cache, as in steady-state inference)
        iters = max(1, round(seconds / (_time(paths["fixed"], 1) / 1000)))
        best = {k: float("inf") for k in paths}
        for r in range(reps):
            for k in list(paths) if r % 2 == 0 else list(paths)[::-1]:
                best[k] = min(best[k], _time(paths[k], iters))
        rows.append({"size": list(size), "ms": best, "ratio": best["fixed"] / best["ours"]})
    return rows


def run_family_bench(
    tiny: bool = False,
    batch: int = 8,
    reps: int = 5,
    print_fn: Callable[[str], None] = print,
    families: Optional[Sequence[str]] = None,
) -> dict[str, list[dict[str, Any]]]:
    """Run every case (or the tiny ones), print a ratio table, return the measurements by family."""
    cases = TINY_CASES if tiny else FAMILY_CASES
    batch, reps = (1, 1) if tiny else (batch, reps)
    head = f"{'family':<8} {'arch':<30} {'size':>9} {'ours ms':>9} {'fixed ms':>9} {'vs fixed':>9}"
    print_fn(head)
    print_fn("-" * len(head))
    results: dict[str, list[dict[str, Any]]] = {}
    for family, arch, args, own, sizes in cases:
        if families and family not in families:
            continue
        rows = results[family] = bench_family(arch, args, own, sizes, batch, reps, seconds=0.01 if tiny else 0.3)
        for i, row in enumerate(rows):
            size = "x".join(map(str, row["size"])) + ("*" if i == 0 else "")
            print_fn(
                f"{family:<8} {arch:<30} {size:>9} {row['ms']['ours']:>9.2f} {row['ms']['fixed']:>9.2f} "
                f"{row['ratio']:>9.3f}"
            )
    print_fn(
        f"batch {batch}; * the model's own size; 'fixed': a timm model built for that size (no dynamic code); "
        f"ratio > 1: ours is faster"
    )
    return results
