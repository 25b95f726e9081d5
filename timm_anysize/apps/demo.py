"""``timm-anysize demo``: adapt the shipped digits ViT to many geometries and measure what each adaptation costs.

For each variant of ``configs/demo/digits.yaml`` (registered by :func:`register_demo_variants`, not on
``import timm_anysize``) it measures, on the fixed held-out split of the scikit-learn digits:
zero-shot accuracy of the adapted weights, accuracy after a short fine-tune, accuracy of the same architecture
trained from scratch with the same budget, and inference throughput. Naive alternatives (plain kernel
interpolation, nearest or truncated position embeddings) are measured next to ours. Each adapted row is also
calibrated without labels (:func:`timm_anysize.calibrate`: the base at its own geometry teaches the variant on the
training images, their labels unused).
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import timm
import torch
import torch.nn as nn

import timm_anysize
from timm_anysize.apps.digits import (
    BASE_VARIANT,
    evaluate,
    images_per_second,
    load_digits_split,
    register_demo_variants,
    render,
    train,
)
from timm_anysize.core.attributes import module_attr, size_attr
from timm_anysize.core.errors import WeightsError
from timm_anysize.hub import ExportError, Metric
from timm_anysize.weight_files import read_state_dict

__all__ = [
    "DemoRow",
    "run_demo",
    "register_demo_variants",
    "metrics_from_demo",
    "run_flexi_demo",
    "format_flexi_table",
    "gap_closed",
    "DEMO_ROWS",
    "QUICK_ROWS",
    "FLEXI_PATCHES",
]


@dataclass(frozen=True)
class Calibration:
    """The budget of one demo calibration (:func:`timm_anysize.calibrate` arguments)."""

    steps: int
    batch_size: int = 64
    lr: float = 5e-4


@dataclass(frozen=True)
class RowDef:
    variant: str
    label: str
    naive: bool = False
    tweak: Optional[str] = None  # a demo-only change applied after loading ("truncate_pos_embed")
    # None: not calibrated (the base is its own teacher; a naive row is shown for its zero-shot only)
    calibration: Optional[Calibration] = None


# Calibration budgets, in images seen, sized by the gap to close and the tokens per image (the demo's time); rows
# that lose nothing zero-shot are not calibrated.
DEMO_ROWS = (
    RowDef(BASE_VARIANT, "base, same geometry"),
    # not calibrated: PI-resize keeps the base's accuracy (nothing to recover); measured: 20 steps of 32 lost 0.6
    # points, 150 of 64 at lr 3e-4 kept 97.2 % at a cost the demo's 4 minutes cannot take
    RowDef("vit_digits_patch8_64", "patch 4->8, PI-resize"),
    RowDef("vit_digits_patch8_64_interp", "patch 4->8, plain kernel interpolation", naive=True),
    RowDef("vit_digits_patch2_16", "patch 4->2 (16 px), PI-resize", calibration=Calibration(150, lr=3e-4)),
    RowDef("vit_digits_patch4_24", "grid 8->6, bicubic pos-embed", calibration=Calibration(100)),
    RowDef("vit_digits_patch4_24", "grid 8->6, truncated pos-embed", naive=True, tweak="truncate_pos_embed"),
    RowDef("vit_digits_patch4_48", "grid 8->12, bicubic pos-embed", calibration=Calibration(60)),
    RowDef("vit_digits_patch4_48_nearest", "grid 8->12, nearest pos-embed", naive=True),
    RowDef("vit_digits_patch4_64", "grid 8->16, bicubic pos-embed", calibration=Calibration(25)),
    RowDef("vit_digits_patch4_32x48", "grid 8x8->8x12, non-square", calibration=Calibration(60)),
    # not calibrated: the channel adaptation is exact (the student agrees with its teacher on every image before any
    # step), so there is nothing to recover, and Adam's steps near agreement only add noise (a quick run lost 0.6)
    RowDef("vit_digits_patch4_32_rgb", "channels 1->3"),
)
# One calibration for the run-time patch sizes 2, 4 and 8 at 32 px (the flexi section).
FLEXI_CALIBRATION = Calibration(100)
QUICK_ROWS = tuple(DEMO_ROWS[i] for i in (0, 1, 2, 6, 10))


@dataclass
class DemoRow:
    """One line of the fidelity table."""

    variant: str
    label: str
    naive: bool
    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    in_chans: int
    tokens: int
    zero_shot: float
    finetuned: Optional[float]
    scratch: Optional[float]
    images_per_s: float
    non_copied: dict[str, str] = field(default_factory=dict)
    calibrated: Optional[float] = None  # accuracy after calibration without labels
    calibration: Optional[dict] = None  # its steps, batch, lr, and its wall and CPU (user + sys) seconds
    gap_closed: Optional[float] = None  # % of the zero-shot -> fine-tuned gap calibration closed (image counts)


def _truncate_pos_embed(model: nn.Module, base: nn.Module) -> None:
    """The classic bug: keep the first N position embeddings of the source grid instead of resampling."""
    with torch.no_grad():
        pos_embed = module_attr(model, "pos_embed", torch.Tensor)
        pos_embed.copy_(module_attr(base, "pos_embed", torch.Tensor)[:, : pos_embed.shape[1]])


def _bit_identical_to_plain_timm(base: nn.Module, x: torch.Tensor) -> bool:
    """The base variant against plain timm loading the same file into the same architecture."""
    spec = timm_anysize.get_variant(BASE_VARIANT)
    plain = timm.create_model(spec.arch, img_size=32, patch_size=4, in_chans=1, num_classes=10, **spec.model_args)
    if spec.pretrained.file is None:  # the shipped base variant names its weights file
        raise WeightsError(f"{BASE_VARIANT}: no pretrained.file to compare plain timm with")
    plain.load_state_dict(read_state_dict(spec.pretrained.file))
    with torch.no_grad():
        return torch.equal(plain.eval()(x), base.eval()(x))


def run_demo(
    out_dir: Union[str, Path] = "anysize-demo",
    epochs: int = 2,
    quick: bool = False,
    progress: bool = True,
    seed: int = 0,
    print_fn: Callable[[str], None] = print,
    flexi_section: bool = True,
) -> dict:
    """Run the demo, print the table, and write ``results.json`` and ``accuracy_vs_geometry.png`` to ``out_dir``.

    Args:
        out_dir: Output folder (created).
        epochs: Fine-tune and from-scratch epochs per variant (the same budget for both).
        quick: A smoke run: 5 variants, 1 epoch at most, 480 training images.
        progress: Show a progress bar.
        seed: Seed of fine-tuning and from-scratch runs.
        print_fn: Where the table goes.
        flexi_section: Also run the run-time patch size section (:func:`run_flexi_demo`; ``results["flexi"]``).

    Returns:
        The results dict written to ``results.json``.
    """
    from tqdm.auto import tqdm

    register_demo_variants()
    torch.manual_seed(seed)
    rows_def = QUICK_ROWS if quick else DEMO_ROWS
    epochs = min(epochs, 1) if quick else epochs
    split = load_digits_split()
    train_x8, train_y = split.train_x, split.train_y
    if quick:
        train_x8, train_y = train_x8[:480], train_y[:480]
    batch_size = 32
    calibrations = [_quick(r.calibration, quick) for r in rows_def if r.calibration is not None and epochs > 0]
    steps = sum(0 if r.naive else 2 * epochs * math.ceil(len(train_y) / batch_size) for r in rows_def)
    steps += sum(c.steps for c in calibrations)
    bar = tqdm(total=steps + len(rows_def), desc="demo", disable=not progress)
    start = time.perf_counter()
    base = timm.create_model(BASE_VARIANT, pretrained=True).eval()

    rows: list[DemoRow] = []
    for r in rows_def:
        bar.set_postfix_str(r.variant)
        model = timm.create_model(r.variant, pretrained=True).eval()
        if r.tweak == "truncate_pos_embed":
            _truncate_pos_embed(model, base)
        c, h, w = module_attr(model, "pretrained_cfg", dict)["input_size"]
        x_test = render(split.test_x, (h, w), model)
        zero_shot = evaluate(model, x_test, split.test_y)
        ips = images_per_second(model, x_test)
        finetuned = scratch = calibrated = calibration = None
        if r.calibration is not None and epochs > 0:
            calibrated_model, calibration = _calibrated(model, train_x8, _quick(r.calibration, quick), seed)
            bar.update(calibration["steps"])
            calibrated = evaluate(calibrated_model, x_test, split.test_y)
        if not r.naive and epochs > 0:
            x_train = render(train_x8, (h, w), model)
            tuned = copy.deepcopy(model)
            train(
                tuned,
                x_train,
                train_y,
                epochs,
                lr=5e-4,
                batch_size=batch_size,
                seed=seed,
                on_step=lambda _: bar.update(1),
            )
            finetuned = evaluate(tuned, x_test, split.test_y)
            torch.manual_seed(seed)
            fresh = timm.create_model(r.variant, pretrained=False)
            train(
                fresh,
                x_train,
                train_y,
                epochs,
                lr=5e-4,
                batch_size=batch_size,
                seed=seed,
                on_step=lambda _: bar.update(1),
            )
            scratch = evaluate(fresh, x_test, split.test_y)
        report = timm_anysize.adaptation_report(model)
        non_copied = {e.key: f"{e.action}: {e.detail}" for e in report.non_copied()} if report else {}
        if r.tweak == "truncate_pos_embed":
            non_copied["pos_embed"] = "truncated: first tokens of the 8x8 grid (naive)"
        grid = size_attr(model.get_submodule("patch_embed"), "grid_size")
        rows.append(
            DemoRow(
                r.variant,
                r.label,
                r.naive,
                (h, w),
                size_attr(model.get_submodule("patch_embed"), "patch_size"),
                c,
                grid[0] * grid[1] + module_attr(model, "num_prefix_tokens", int),
                zero_shot,
                finetuned,
                scratch,
                ips,
                non_copied,
                calibrated,
                calibration,
                gap_closed(zero_shot, calibrated, finetuned, len(split.test_y)),
            )
        )
        bar.update(1)
    bar.close()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    flexi = run_flexi_demo(out, epochs, quick, seed, print_fn=None) if flexi_section else None
    identical = _bit_identical_to_plain_timm(base, render(split.test_x[:64], (32, 32), base))
    elapsed = time.perf_counter() - start
    results = {
        "settings": {
            "epochs": epochs,
            "quick": quick,
            "seed": seed,
            "batch_size": batch_size,
            "lr": 5e-4,
            "train_images": len(train_y),
            "held_out_images": len(split.test_y),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"timm {timm.__version__}",
            "seconds": round(elapsed, 1),
        },
        "base_bit_identical_to_plain_timm": identical,
        "rows": [asdict(r) for r in rows],
    }
    if flexi is not None:
        results["flexi"] = flexi
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _plot(rows, out / "accuracy_vs_geometry.png")
    print_fn(format_table(rows))
    if flexi is not None:
        print_fn(format_flexi_table(flexi))
    print_fn(f"base variant bit-identical to plain timm on the same weights: {identical}")
    print_fn(f"{elapsed:.0f} s; results in {out / 'results.json'} and {out / 'accuracy_vs_geometry.png'}")
    return results


def gap_closed(zero_shot: float, calibrated: Optional[float], finetuned: Optional[float], n: int) -> Optional[float]:
    """The share of the gap from zero-shot to the labelled fine-tune that calibration closed, in percent.

    Computed from the image counts behind the accuracies (each is ``100 * correct / n``), not from their rounded
    percentages: on 360 images a rounded 0.1 point is a third of an image. None where there is no calibration,
    no fine-tune, or no gap.

    Example:
        >>> gap_closed(100 * 341 / 360, 100 * 350 / 360, 100 * 353 / 360, 360)  # 9 of 12 images
        75.0
    """
    if calibrated is None or finetuned is None:
        return None
    z, c, f = (round(a * n / 100) for a in (zero_shot, calibrated, finetuned))
    return 100.0 * (c - z) / (f - z) if f > z else None


def _quick(calibration: Calibration, quick: bool) -> Calibration:
    """A smoke run's calibration: a few steps."""
    if not quick:
        return calibration
    return Calibration(min(calibration.steps, 4), min(calibration.batch_size, 16), calibration.lr)


def _calibrated(
    model: nn.Module, images: torch.Tensor, budget: Calibration, seed: int, patch_sizes: Optional[tuple] = None
) -> tuple[nn.Module, dict]:
    """A copy of ``model`` calibrated without labels on ``images``, and what it took (wall and CPU seconds)."""
    calibrated = copy.deepcopy(model)
    cpu = time.process_time()
    report = timm_anysize.calibrate(
        calibrated,
        images,
        steps=budget.steps,
        batch_size=budget.batch_size,
        lr=budget.lr,
        patch_sizes=patch_sizes,
        held_out=32,
        seed=seed,
        progress=False,
    )
    return calibrated.eval(), {
        "steps": report.steps,
        "batch_size": budget.batch_size,
        "lr": budget.lr,
        "images": report.images,
        "seconds": report.seconds,
        "cpu_seconds": round(time.process_time() - cpu, 1),
    }


def metrics_from_demo(results: Optional[Union[str, os.PathLike]], variant: str) -> list[Metric]:
    """The fidelity numbers ``timm-anysize demo`` measured for ``variant`` (from its ``results.json``), as metrics.

    The file is named explicitly (``export --demo-results``): what goes into a card never depends on the folder a
    command runs in.

    Returns:
        The metrics; an empty list without a file (None), or when the demo did not measure that variant.

    Raises:
        ExportError: The file does not exist or is not a demo's results.json.

    Example:
        >>> metrics_from_demo(None, "vit_digits_patch8_64")
        []
    """
    if results is None:
        return []
    path = Path(results)
    if not path.is_file():
        raise ExportError(f"{path}: no such file; --demo-results names a results.json written by `timm-anysize demo`")
    try:
        rows = json.loads(path.read_text())["rows"]
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{path}: not a timm-anysize demo results.json ({e})") from e
    row = next((r for r in rows if r.get("variant") == variant and not r.get("naive")), None)
    if row is None:
        return []
    named = (
        ("zero-shot top-1 accuracy", "zero_shot"),
        ("fine-tuned top-1 accuracy", "finetuned"),
        ("from-scratch top-1 accuracy (same budget)", "scratch"),
    )
    return [
        Metric(name, float(row[key]), dataset="sklearn-digits", dataset_name="scikit-learn digits", split="held-out")
        for name, key in named
        if row.get(key) is not None
    ]


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:5.1f}"


def _pct_int(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.0f}"


def format_table(rows: list[DemoRow]) -> str:
    """The fidelity table as aligned text (also used for the README)."""
    head = (
        f"{'variant':<30} {'change':<40} {'geometry':<16} {'tokens':>6} {'zero-shot':>9} "
        f"{'calibrated (no labels)':>22} {'fine-tuned':>10} {'gap closed':>10} {'scratch':>7} {'img/s':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        geo = f"{r.img_size[0]}x{r.img_size[1]}/p{r.patch_size[0]}/{r.in_chans}ch"
        label = r.label + (" *" if r.naive else "")
        lines.append(
            f"{r.variant:<30} {label:<40} {geo:<16} {r.tokens:>6} {_pct(r.zero_shot):>9} {_pct(r.calibrated):>22} "
            f"{_pct(r.finetuned):>10} {_pct_int(r.gap_closed):>10} {_pct(r.scratch):>7} {r.images_per_s:>7.0f}"
        )
    lines.append("* naive alternative, shown for comparison; accuracy in % on the 360 held-out digits")
    lines.append(
        "calibrated (no labels): distilled from the base at its own geometry on the training images, labels unused; "
        "gap closed: its share of the gap from zero-shot to fine-tuned, in images"
    )
    return "\n".join(lines)


def _plot(rows: list[DemoRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    xs = range(len(rows))
    width = 0.21
    series = (
        ("zero-shot", "zero_shot", "#4c72b0"),
        ("calibrated, no labels", "calibrated", "#8172b2"),
        ("fine-tuned", "finetuned", "#55a868"),
        ("scratch, same budget", "scratch", "#c44e52"),
    )
    for i, (name, attr, color) in enumerate(series):
        vals = [getattr(r, attr) or 0.0 for r in rows]
        ax.bar([x + (i - 1.5) * width for x in xs], vals, width, label=name, color=color)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(
        [
            f"{r.img_size[0]}x{r.img_size[1]}/p{r.patch_size[0]}/{r.in_chans}ch\n{r.label}" + (" *" if r.naive else "")
            for r in rows
        ],
        rotation=35,
        ha="right",
        fontsize=7,
    )
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("timm-anysize: digits ViT adapted to new geometries (* naive alternative)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- run-time patch size (FlexiViT) ------------------------------------------------------------------------------

FLEXI_PATCHES = (2, 4, 8)


def run_flexi_demo(
    out_dir: Union[str, Path] = "anysize-demo",
    epochs: int = 2,
    quick: bool = False,
    seed: int = 0,
    print_fn: Optional[Callable[[str], None]] = print,
) -> dict:
    """One model, any patch size (``timm_anysize.flexi``): the digits base fine-tuned with a patch size drawn per
    batch (FlexiViT) against the same fine-tune at its single patch 4, both evaluated at every patch of
    ``FLEXI_PATCHES`` on 32 px inputs (grids 16, 8, 4), with throughput; writes ``flexi.json`` and
    ``flexi_accuracy_vs_throughput.png`` to ``out_dir``.

    Args:
        out_dir: Output folder (created).
        epochs: Fine-tune epochs of each model (the same budget).
        quick: A smoke run: 1 epoch at most, 480 training images.
        seed: Seed of the fine-tunes and of the patch-size draws.
        print_fn: Where the table goes (None: nowhere).

    Returns:
        ``{"settings": ..., "rows": [{"model", "patch", "accuracy", "images_per_s"}, ...]}``.
    """
    register_demo_variants()
    epochs = min(epochs, 1) if quick else epochs
    split = load_digits_split()
    train_x8, train_y = split.train_x, split.train_y
    if quick:
        train_x8, train_y = train_x8[:480], train_y[:480]
    base = timm.create_model(BASE_VARIANT, pretrained=True).eval()
    x_train, x_test = render(train_x8, (32, 32), base), render(split.test_x, (32, 32), base)
    models = {"zero-shot": base}
    calibration = None
    if epochs > 0:
        single = copy.deepcopy(base)
        train(single, x_train, train_y, epochs, lr=5e-4, seed=seed)
        flexi = timm_anysize.enable_flexi(copy.deepcopy(base), FLEXI_PATCHES, seed=seed)
        train(flexi, x_train, train_y, epochs, lr=5e-4, seed=seed)
        calibrated, calibration = _calibrated(base, train_x8, _quick(FLEXI_CALIBRATION, quick), seed, FLEXI_PATCHES)
        models.update({"single patch 4": single, "flexi 2/4/8": flexi, "calibrated 2/4/8": calibrated})
    rows = []
    for name, model in models.items():
        for p in FLEXI_PATCHES:
            with timm_anysize.patch_size(model, p):
                rows.append(
                    {
                        "model": name,
                        "patch": p,
                        "accuracy": evaluate(model, x_test, split.test_y),
                        "images_per_s": images_per_second(model, x_test, min_time=0.1 if quick else 0.3),
                    }
                )
    results = {
        "settings": {
            "epochs": epochs,
            "quick": quick,
            "seed": seed,
            "train_images": len(train_y),
            "patch_sizes": list(FLEXI_PATCHES),
            "img_size": 32,
            "calibration": calibration,
        },
        "rows": rows,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flexi.json").write_text(json.dumps(results, indent=2))
    _plot_flexi(rows, out / "flexi_accuracy_vs_throughput.png")
    if print_fn is not None:
        print_fn(format_flexi_table(results))
    return results


def format_flexi_table(results: dict) -> str:
    """The flexi section as aligned text: accuracy (%) / images per second at each patch size, per model."""
    patches = results["settings"]["patch_sizes"]
    head = f"{'one model, patch at run time':<28}" + "".join(
        f"{'p' + str(p) + ' (grid ' + str(32 // p) + ')':>22}" for p in patches
    )
    lines = [head, "-" * len(head)]
    for name in dict.fromkeys(r["model"] for r in results["rows"]):
        cells = {r["patch"]: r for r in results["rows"] if r["model"] == name}
        lines.append(
            f"{name:<28}"
            + "".join(f"{cells[p]['accuracy']:>11.1f}% {cells[p]['images_per_s']:>6.0f}/s  " for p in patches)
        )
    lines.append("held-out accuracy and images/s on 32 px digits; every row is one set of weights")
    lines.append("calibrated 2/4/8: one calibration without labels (the base at patch 4 teaching patches 2, 4, 8)")
    return "\n".join(lines)


def _plot_flexi(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = sorted((r["images_per_s"], r["accuracy"], r["patch"]) for r in rows if r["model"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        for ips, acc, p in pts:
            ax.annotate(f"p{p}", (ips, acc), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("images / s (log)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("One model, patch size chosen per call (digits ViT)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
