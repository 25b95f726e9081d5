"""Calibration without labels: a re-sized variant learns from its own source model, from unlabelled images.

A variant's weights were trained at the source geometry (img_size, patch_size, in_chans); at the new one they work,
but lose accuracy until fine-tuned, and most users who re-size a checkpoint have images and no labels. The source
model itself knows the answers: the same checkpoint at its own geometry is the teacher, the variant is the student
(FlexiViT trains its flexible models exactly so: distillation from a fixed-patch teacher). :func:`calibrate` renders
each batch once per geometry -- with the variant's data config for the student and the source's for the teacher --
and distils the teacher's logits (KL with temperature, as timm's ``LogitDistillationTask``) or, where the two heads
differ or there is none, its pooled features (cosine).

Example:
    >>> import tempfile, timm, torch, timm_anysize
    >>> from safetensors.torch import save_file
    >>> path = tempfile.mkdtemp() + "/w.safetensors"
    >>> save_file(timm.create_model("test_vit").state_dict(), path)
    >>> name = timm_anysize.register_variant("calib_doc_vit48", base="test_vit", img_size=48,
    ...                                      pretrained={"file": path})
    >>> model = timm.create_model(name, pretrained=True)
    >>> report = calibrate(model, torch.rand(40, 3, 48, 48), steps=2, batch_size=8, progress=False)
    >>> report.steps, report.target, len(report.losses)
    (2, 'logits', 2)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from tqdm.auto import tqdm

from timm_anysize.calibration_images import ChannelMap, ImagesArg, Render, as_images, default_channel_map, render_of
from timm_anysize.core.errors import CalibrationError
from timm_anysize.core.meta import initialize_fresh, parameters_uninitialised
from timm_anysize.core.safetensors_io import read_metadata, write_safetensors
from timm_anysize.core.variant_plan import VariantPlan
from timm_anysize.flexi import patch_size as flexi_patch_size
from timm_anysize.model_plan import plan_of
from timm_anysize.plan import source_read
from timm_anysize.pretrained_cfg import stats_for_channels
from timm_anysize.source_weights import load_source_state_dict
from timm_anysize.timm_geometry import GEOMETRY_METADATA

__all__ = [
    "calibrate",
    "CalibrationReport",
    "build_teacher",
    "geometry_bound_parameters",
    "save_calibrated",
    "calibration_of",
    "CALIBRATION_METADATA",
]

# The safetensors metadata key of a calibrated file: what the calibration did (teacher, steps, images, agreement).
CALIBRATION_METADATA = "timm_anysize.calibration"
# What of a report a calibrated file and a model card carry: no local path, no loss curve.
_CARD_FIELDS = (
    "teacher",
    "target",
    "metric",
    "trainable",
    "steps",
    "batch_size",
    "lr",
    "images",
    "held_out",
    "geometries",
    "agreement_before",
    "agreement_after",
)

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


@dataclass
class CalibrationReport:
    """What one :func:`calibrate` run did: its steps and time, the loss per step, and how well the student agrees
    with the teacher on held-aside images before and after, per geometry (``metric``: top-1 agreement in percent
    for logits, mean cosine similarity of pooled features for features).
    """

    variant: str
    teacher: str
    target: str  # "logits" or "features"
    metric: str
    trainable: str
    steps: int
    batch_size: int
    lr: float
    images: int
    held_out: int
    seconds: float
    geometries: list[str]
    losses: list[float] = field(default_factory=list)
    agreement_before: dict[str, float] = field(default_factory=dict)
    agreement_after: dict[str, float] = field(default_factory=dict)
    loss_before: dict[str, float] = field(default_factory=dict)  # the distillation loss on the held-aside images
    loss_after: dict[str, float] = field(default_factory=dict)
    completed: bool = True

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the report written beside calibrated weights)."""
        return asdict(self)

    def summary(self) -> str:
        """One line per geometry: the agreement before -> after."""
        unit = "%" if self.target == "logits" else ""
        lines = [
            f"{self.variant}: {self.steps} steps on {self.images} unlabelled images in {self.seconds:.1f} s "
            f"(teacher: {self.teacher}; {self.metric})"
        ]
        for g in self.geometries:
            lines.append(f"  {g}: {self.agreement_before[g]:.3f}{unit} -> {self.agreement_after[g]:.3f}{unit}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# The teacher: the variant's source weights at their own geometry
# ---------------------------------------------------------------------------------------------------------------------


def _plan_of(model: nn.Module) -> VariantPlan:
    plan = plan_of(model)
    if plan is None:
        raise CalibrationError(
            f"{type(model).__name__}: not a timm-anysize variant built with pretrained=True; calibrate a model "
            f"from timm.create_model(VARIANT, pretrained=True)"
        )
    return plan


def _weights_cfg(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {k: cfg.get(k) for k in ("url", "file", "hf_hub_id", "hf_hub_filename")}


def build_teacher(model: nn.Module) -> nn.Module:
    """The variant's source model: the same checkpoint at its own img_size / patch_size / in_chans, frozen, in eval
    mode, in the variant's dtype and on its device (Hub and URL weights come from the download cache).

    Raises:
        CalibrationError: ``model`` is not a variant, or its source weights do not cover the source model.

    Example:
        >>> import tempfile, timm, torch, timm_anysize
        >>> from safetensors.torch import save_file
        >>> path = tempfile.mkdtemp() + "/w.safetensors"
        >>> save_file(timm.create_model("test_vit").state_dict(), path)
        >>> name = timm_anysize.register_variant("calib_doc_teacher", base="test_vit", img_size=64, patch_size=8,
        ...                                      pretrained={"file": path})
        >>> teacher = build_teacher(timm.create_model(name, pretrained=True))
        >>> tuple(teacher.patch_embed.patch_size), teacher.training
        ((16, 16), False)
    """
    return _build_teacher(model)[0]


def _build_teacher(model: nn.Module) -> tuple[nn.Module, bool]:
    """The teacher, and whether the checkpoint lacks the source's head (then features are distilled)."""
    plan = _plan_of(model)
    source_sd, _ = load_source_state_dict(source_read(plan), _weights_cfg(model))
    with parameters_uninitialised():
        teacher = plan.family.create(partial(timm.create_model, plan.spec.base, pretrained=False), plan.source_kwargs)
    own = set(teacher.state_dict())
    missing = sorted(own - set(source_sd))
    head = {k for k in own if any(k.startswith(c.rsplit(".", 1)[0]) for c in plan.classifier_keys)}
    if missing and not set(missing) <= head:
        raise CalibrationError(
            f"{plan.spec.name}: the source weights do not cover the source model ({', '.join(missing[:4])}...); "
            f"pass teacher=MODEL to calibrate"
        )
    teacher.load_state_dict({k: v for k, v in source_sd.items() if k in own}, strict=False, assign=True)
    initialize_fresh(teacher, missing)
    like = next(model.parameters())
    return teacher.to(device=like.device, dtype=like.dtype).eval().requires_grad_(False), bool(missing)


# ---------------------------------------------------------------------------------------------------------------------
# Images: unlabelled, in [0, 1], rendered once per geometry
# ---------------------------------------------------------------------------------------------------------------------


def _teacher_render(model: nn.Module, teacher: nn.Module, plan: VariantPlan, user_teacher: bool) -> Render:
    if user_teacher:
        return render_of(teacher)
    # The source's data config: the normalisation its weights expect (the variant's `data:` stats, else the base's,
    # at the source's channel count, as the variant's own cfg derives them), its size, the variant's interpolation.
    student = render_of(model)
    c, data, base = plan.source.in_chans, plan.spec.data, plan.base_cfg
    mean = stats_for_channels(data.mean or base.get("mean", IMAGENET_DEFAULT_MEAN), c)
    std = stats_for_channels(data.std or base.get("std", IMAGENET_DEFAULT_STD), c)
    return Render(plan.source.img_size, c, mean, std, student.interpolation)


# ---------------------------------------------------------------------------------------------------------------------
# What learns, and what it learns
# ---------------------------------------------------------------------------------------------------------------------


def geometry_bound_parameters(model: nn.Module) -> list[str]:
    """The names of a variant's parameters bound to its geometry: position embeddings and relative-position tables
    (every tensor the plan resamples), the patch kernel(s), and every norm's affine parameters.

    Example:
        >>> import timm, timm_anysize
        >>> name = timm_anysize.register_variant("calib_doc_geo", base="test_vit", img_size=48)
        >>> names = geometry_bound_parameters(timm.create_model(name))
        >>> "pos_embed" in names, "patch_embed.proj.weight" in names, "blocks.0.attn.qkv.weight" in names
        (True, True, False)
    """
    plan = _plan_of(model)
    keys = set(plan.resamples) | set(plan.patch_keys) | {k.removesuffix(".weight") + ".bias" for k in plan.patch_keys}
    norms = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, _NORMS) for p, _ in m.named_parameters()}
    names = [n for n, _ in model.named_parameters()]
    return [n for n in names if n in keys or n in norms]


def _six_digits(value: float) -> float:
    """Six significant digits (a loss near agreement is 1e-5 or less: six decimals would round its changes away)."""
    return float(f"{value:.6g}")


def _keep_batch_norm_statistics(model: nn.Module) -> None:
    """Batch norms in eval mode while the rest trains: they normalise with the source's running statistics and keep
    them. A calibration batch is small (and split over the ranks under DDP): its statistics are noisy, differ per
    rank, and would overwrite what the source measured on its training set."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):  # BatchNorm1d/2d/3d, SyncBatchNorm, timm's *Act
            module.eval()


@contextlib.contextmanager
def _geometry(model: nn.Module, patch: Optional[tuple[int, int]]) -> Iterator[None]:
    if patch is None:
        yield
    else:
        with flexi_patch_size(model, patch):
            yield


def _describe(img_size: tuple[int, int], patch: Optional[tuple[int, int]]) -> str:
    where = f"{img_size[0]}x{img_size[1]} px"
    return where + (f", patch {patch[0]}x{patch[1]}" if patch is not None else "")


def _pooled(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled features (pre-logits) where the model has timm's two-step forward, else its output."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]  # torch types them Tensor | Module
    out = model(x)
    return out[-1].flatten(2).mean(-1) if isinstance(out, (list, tuple)) else out


def _targets(model: nn.Module, teacher: nn.Module, headless: bool) -> str:
    student_classes = getattr(model, "num_classes", 0)
    if headless or not student_classes:
        return "features"
    return "logits" if student_classes == getattr(teacher, "num_classes", -1) else "features"


def _outputs(model: nn.Module, x: torch.Tensor, target: str) -> torch.Tensor:
    return model(x) if target == "logits" else _pooled(model, x)


def _loss_per_image(student: torch.Tensor, teacher: torch.Tensor, target: str, temperature: float) -> torch.Tensor:
    if target == "logits":  # KL(teacher || student) at a temperature, scaled by T^2 (Hinton et al.; timm's KD task)
        t = F.log_softmax(teacher.float() / temperature, dim=-1)
        s = F.log_softmax(student.float() / temperature, dim=-1)
        return (t.exp() * (t - s)).sum(-1) * temperature**2
    return 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)


@torch.no_grad()
def _agreement(student: torch.Tensor, teacher: torch.Tensor, target: str) -> torch.Tensor:
    if target == "logits":
        return (student.argmax(-1) == teacher.argmax(-1)).float() * 100.0
    return F.cosine_similarity(student.float(), teacher.float(), dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Cancelling between steps
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Ctrl-C during the block is raised when it ends: an optimiser step is never left half-applied."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda *a: pending.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------------------------------
# calibrate
# ---------------------------------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def calibrate(
    model: nn.Module,
    images: ImagesArg,
    *,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 2e-4,
    patch_sizes: Optional[Sequence[Union[int, Sequence[int]]]] = None,
    img_sizes: Optional[Sequence[Union[int, Sequence[int]]]] = None,
    teacher: Optional[nn.Module] = None,
    trainable: str = "all",
    temperature: float = 1.0,
    held_out: Optional[int] = None,
    channel_map: Optional[ChannelMap] = None,
    seed: int = 0,
    progress: bool = True,
) -> CalibrationReport:
    """Distil a variant's source model (at its own geometry) into the variant, from unlabelled images, in place.

    Each step draws ``batch_size`` images and one geometry (an img_size of ``img_sizes`` and a patch size of
    ``patch_sizes``, FlexiViT-style, so one set of weights learns them all), renders the batch for the student at
    that geometry and for the teacher at the source's, and takes one AdamW step (cosine schedule, 5% warm-up) on the
    KL divergence of the logits (same head) or the cosine distance of the pooled features (a new head, or none).
    Batch norms keep the source's running statistics (they stay in eval mode: a calibration batch is too small to
    re-estimate them). Under ``torch.distributed`` (DDP, any backend) the global batch is split over the ranks and
    the gradients averaged: the same weights as one process with the same ``batch_size``. Ctrl-C stops between
    steps (the weights change only when a step completes) and returns the report so far (``completed=False``).

    Args:
        model: A variant built with ``pretrained=True`` (updated in place; its train/eval mode is restored).
        images: Unlabelled images: a float tensor ``[N, C, H, W]`` in [0, 1] at any size, a folder of image files
            (any nesting), or an iterable (a DataLoader) of such batches (``(images, ...)`` tuples too).
        steps: Optimiser steps.
        batch_size: Images per step (the global batch under DDP).
        lr: Peak learning rate.
        patch_sizes: Run-time patch sizes to calibrate for (None: the variant's own).
        img_sizes: Input sizes to calibrate for (None: the variant's own).
        teacher: Another teacher (any model taking the source's input); by default the variant's source model.
        trainable: ``"all"`` parameters, or ``"geometry"``: only those bound to the geometry
            (:func:`geometry_bound_parameters`).
        temperature: Softmax temperature of the logit distillation.
        held_out: Images set aside to measure the agreement before and after (default: 10%, 32 to 512).
        channel_map: ``f(images, in_chans)`` giving the images at a model's channel count (default:
            :func:`~timm_anysize.calibration_images.default_channel_map`).
        seed: Seed of the batch, geometry and held-out draws.
        progress: Show a progress bar.

    Returns:
        The report: steps, time, losses and agreement with the teacher per geometry before and after.

    Raises:
        CalibrationError: Not a variant, no images, unreadable images, or a bad argument.
    """
    started = time.perf_counter()
    plan = _plan_of(model)
    if steps < 0 or batch_size < 1 or lr <= 0 or temperature <= 0:
        raise CalibrationError(
            f"steps={steps}, batch_size={batch_size}, lr={lr}, temperature={temperature}: steps >= 0, batch_size >= "
            f"1, lr > 0 and temperature > 0"
        )
    if trainable not in ("all", "geometry"):
        raise CalibrationError(f"trainable={trainable!r}: use 'all' or 'geometry'")
    rank, world = _world()
    user_teacher = teacher is not None
    teacher, headless = (teacher, False) if teacher is not None else _build_teacher(model)
    teacher.eval().requires_grad_(False)
    channel_map = channel_map or default_channel_map
    own = render_of(model)
    sizes = [own.img_size] if not img_sizes else [_pair(s, "img_sizes") for s in img_sizes]
    patches: list[Optional[tuple[int, int]]] = (
        [None] if not patch_sizes else [_pair(p, "patch_sizes") for p in patch_sizes]
    )
    geometries = [(s, p) for s in sizes for p in patches]
    labels = [_describe(s, p) for s, p in geometries]
    teacher_render = _teacher_render(model, teacher, plan, user_teacher)
    raw_size = (
        max([teacher_render.img_size[0], *(s[0] for s in sizes)]),
        max([teacher_render.img_size[1], *(s[1] for s in sizes)]),
    )
    data = as_images(images, raw_size)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=gen)
    n_held = held_out if held_out is not None else min(512, max(32, len(data) // 10))
    n_held = min(n_held, max(len(data) - 1, 1))
    held, pool = data[order[:n_held]], data[order[n_held:]] if len(data) > n_held else data[order[:n_held]]
    target = _targets(model, teacher, headless)
    like = next(model.parameters())
    device, dtype = like.device, like.dtype

    def forward_pair(x: torch.Tensor, geometry: tuple[tuple[int, int], Optional[tuple[int, int]]]):
        size, patch = geometry
        s_in = Render(size, own.in_chans, own.mean, own.std, own.interpolation)(x, channel_map)
        t_in = teacher_render(x, channel_map)
        with torch.no_grad():
            t_out = _outputs(teacher, t_in.to(device=device, dtype=dtype), target)
        with _geometry(model, patch):
            s_out = _outputs(model, s_in.to(device=device, dtype=dtype), target)
        return s_out, t_out

    @torch.no_grad()
    def agreement() -> tuple[dict[str, float], dict[str, float]]:
        was = model.training
        model.eval()
        scores, losses = {}, {}
        for label, g in zip(labels, geometries):
            pairs = [forward_pair(held[i : i + 128], g) for i in range(0, len(held), 128)]
            scores[label] = round(float(torch.cat([_agreement(s, t, target) for s, t in pairs]).mean()), 4)
            per_image = [_loss_per_image(s, t, target, temperature) for s, t in pairs]
            losses[label] = _six_digits(float(torch.cat(per_image).mean()))
        model.train(was)
        return scores, losses

    before, loss_before = agreement()
    names = geometry_bound_parameters(model) if trainable == "geometry" else [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    learn = [params[n] for n in names if params[n].is_floating_point()]
    frozen = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in names)
    opt = torch.optim.AdamW(learn, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(steps, 1)))
    )
    losses: list[float] = []
    completed = True
    was_training = model.training
    model.train()
    _keep_batch_norm_statistics(model)
    bar = _progress(steps, plan.spec.name, progress and rank == 0)
    try:
        for _ in range(steps):
            pick = torch.randint(len(pool), (batch_size,), generator=gen)
            geometry = geometries[int(torch.randint(len(geometries), (1,), generator=gen))]
            local = pick[rank::world]  # this rank's share of the global batch
            opt.zero_grad(set_to_none=True)
            if len(local):
                s_out, t_out = forward_pair(pool[local], geometry)
                loss = _loss_per_image(s_out, t_out, target, temperature).sum() / batch_size
                loss.backward()
                value = loss.detach().float()
            else:
                value = torch.zeros((), device=device)
            if world > 1:
                for p in learn:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                dist.all_reduce(value)
            with _sigint_deferred():
                torch.nn.utils.clip_grad_norm_(learn, 1.0)
                opt.step()
                sched.step()
            losses.append(_six_digits(float(value)))
            bar.update(1)
            bar.set_postfix_str(f"loss {losses[-1]:.4f}")
    except KeyboardInterrupt:
        completed = False
    finally:
        bar.close()
        for n, p in params.items():
            p.requires_grad_(frozen[n])
        model.train(was_training)
    after, loss_after = agreement()
    return CalibrationReport(
        variant=plan.spec.name,
        teacher=(
            type(teacher).__name__ if user_teacher else f"{plan.spec.base} at {plan.source.describe()} (its weights)"
        ),
        target=target,
        metric="top-1 agreement (%)" if target == "logits" else "pooled-feature cosine",
        trainable=trainable,
        steps=len(losses),
        batch_size=batch_size,
        lr=lr,
        images=len(pool),
        held_out=len(held),
        seconds=round(time.perf_counter() - started, 2),
        geometries=labels,
        losses=losses,
        agreement_before=before,
        agreement_after=after,
        loss_before=loss_before,
        loss_after=loss_after,
        completed=completed,
    )


def _pair(v: Union[int, Sequence[int]], what: str) -> tuple[int, int]:
    pair = (int(v), int(v)) if isinstance(v, int) else tuple(int(x) for x in v)
    if len(pair) != 2 or min(pair) < 1:
        raise CalibrationError(f"{what}: {v!r} is not a size; use an int or (height, width)")
    return pair  # type: ignore[return-value]


def _progress(total: int, desc: str, enabled: bool) -> Any:
    return tqdm(total=total, desc=f"calibrate {desc}", disable=not enabled, leave=False)


def save_calibrated(model: nn.Module, report: CalibrationReport, out: Union[str, os.PathLike]) -> Path:
    """Write a calibrated variant's weights to ``out`` (safetensors, atomically) and the report beside them
    (``<out>.calibration.json``, no local paths in either).

    The file holds the weights at the variant's geometry, and its metadata says so (the variant, the geometry, the
    calibration): ``timm.create_model(variant, pretrained=True, pretrained_cfg_overlay=dict(file=out))``, or a
    variant whose ``pretrained.file`` names it, loads it with every tensor copied.

    Returns:
        The weight file.

    Example:
        >>> import tempfile, timm, torch, timm_anysize
        >>> from safetensors.torch import save_file
        >>> d = tempfile.mkdtemp()
        >>> save_file(timm.create_model("test_vit").state_dict(), d + "/w.safetensors")
        >>> name = timm_anysize.register_variant("calib_doc_save", base="test_vit", img_size=48,
        ...                                      pretrained={"file": d + "/w.safetensors"})
        >>> model = timm.create_model(name, pretrained=True)
        >>> report = calibrate(model, torch.rand(40, 3, 48, 48), steps=1, batch_size=4, progress=False)
        >>> path = save_calibrated(model, report, d + "/calibrated.safetensors")
        >>> again = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        >>> all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
        True
    """
    plan = _plan_of(model)
    path = Path(out)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    t = plan.target
    geometry = {"img_size": list(t.img_size), "in_chans": t.in_chans, "num_classes": t.num_classes}
    if t.patch_size is not None:
        geometry["patch_size"] = list(t.patch_size)
    metadata = {
        "format": "pt",
        "timm_anysize.variant": plan.spec.name,
        GEOMETRY_METADATA: json.dumps(geometry),
        CALIBRATION_METADATA: json.dumps({k: getattr(report, k) for k in _CARD_FIELDS}),
    }
    write_safetensors(path, [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()], iter(sd.items()), metadata)
    side = _report_path(path)
    tmp = side.with_name(f".{side.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({**report.to_dict(), "geometry": geometry}, indent=2))
    os.replace(tmp, side)
    return path


def _report_path(weights: Path) -> Path:
    """The report :func:`save_calibrated` writes beside ``weights``: ``<stem>.calibration.json``."""
    return weights.with_name(weights.name.removesuffix(".safetensors") + ".calibration.json")


def calibration_of(path: Optional[Union[str, os.PathLike]]) -> Optional[dict[str, Any]]:
    """What the calibration of a weight file written by :func:`save_calibrated` did (teacher, steps, batch size, lr,
    images, trainable, and the agreement before and after per geometry), from its metadata, completed from the
    ``.calibration.json`` report beside it; None for any other file (or None).

    Example:
        >>> import tempfile, timm, torch, timm_anysize
        >>> from safetensors.torch import save_file
        >>> d = tempfile.mkdtemp()
        >>> save_file(timm.create_model("test_vit").state_dict(), d + "/w.safetensors")
        >>> name = timm_anysize.register_variant("calib_doc_of", base="test_vit", img_size=48,
        ...                                      pretrained={"file": d + "/w.safetensors"})
        >>> model = timm.create_model(name, pretrained=True)
        >>> report = calibrate(model, torch.rand(40, 3, 48, 48), steps=2, batch_size=4, progress=False)
        >>> done = calibration_of(save_calibrated(model, report, d + "/calibrated.safetensors"))
        >>> done["steps"], done["images"], done["geometries"], calibration_of(d + "/w.safetensors")
        (2, 8, ['48x48 px'], None)
    """
    if path is None or not str(path).endswith(".safetensors"):
        return None
    raw = read_metadata(path).get(CALIBRATION_METADATA)
    if raw is None:
        return None
    try:
        found = json.loads(raw)
    except ValueError:
        found = {}
    side = _report_path(Path(path))
    if not set(_CARD_FIELDS) <= set(found) and side.is_file():
        with contextlib.suppress(OSError, ValueError):
            report = json.loads(side.read_text())
            found = {**{k: report[k] for k in _CARD_FIELDS if k in report}, **found}
    return {k: found[k] for k in _CARD_FIELDS if k in found} if isinstance(found, dict) else None
