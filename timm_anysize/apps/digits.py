"""scikit-learn's bundled handwritten digits (real data, offline) as a tiny benchmark for geometry changes.

Holds the fixed train/held-out split, image rendering at any size, and the small train/eval loops used by the
shipped base's training script (``timm-anysize train-digits-base``) and by the demo.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_anysize.registry import register_yaml

__all__ = [
    "DigitsSplit",
    "load_digits_split",
    "render",
    "evaluate",
    "train",
    "images_per_second",
    "BASE_VARIANT",
    "DEMO_CONFIG",
    "register_demo_variants",
    "train_digits_base",
]

BASE_VARIANT = "vit_digits_patch4_32"
# The digits variants (the trained base and the geometries the demo adapts it to), shipped as package data.
DEMO_CONFIG = Path(str(resources.files("timm_anysize.configs"))) / "demo" / "digits.yaml"
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.2


def register_demo_variants() -> list[str]:
    """Register the digits variants of :data:`DEMO_CONFIG` (``vit_digits_*``) as timm models.

    ``import timm_anysize`` does not register them; the demo and the ``timm-anysize`` command line do, through this.
    Safe to call again; builds no model (each variant is planned by its first ``timm.create_model``).

    Returns:
        The variant names.

    Example:
        >>> BASE_VARIANT in register_demo_variants()
        True
    """
    return register_yaml(DEMO_CONFIG, validate=False)


@dataclass(frozen=True)
class DigitsSplit:
    """8x8 digit images in [0, 1] (``[N, 1, 8, 8]``) and labels, split into train and held-out sets."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digits_split(seed: int = SPLIT_SEED) -> DigitsSplit:
    """The fixed split: a stratified 80/20 split of the 1,797 images with ``seed``.

    Example:
        >>> s = load_digits_split()
        >>> tuple(s.train_x.shape), tuple(s.test_x.shape)
        ((1437, 1, 8, 8), (360, 1, 8, 8))
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # scikit-learn is the `demo`/`test` extra
        raise ImportError("the digits data needs scikit-learn: pip install 'timm-anysize[demo]'") from e
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=HELD_OUT_FRACTION, random_state=seed, stratify=data.target)
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    return DigitsSplit(x[tr], y[tr], x[te], y[te])


def render(x8: torch.Tensor, size: Sequence[int], model: nn.Module) -> torch.Tensor:
    """Upsample 8x8 digits to ``size`` (bilinear), repeat to the model's channels, normalise with its data config.

    Example:
        >>> _ = register_demo_variants()
        >>> m = timm.create_model("vit_digits_patch4_32")
        >>> render(torch.rand(2, 1, 8, 8), (32, 48), m).shape
        torch.Size([2, 1, 32, 48])
    """
    cfg = timm.data.resolve_data_config(model=model)
    in_chans = cfg["input_size"][0]
    x = F.interpolate(x8, size=tuple(size), mode="bilinear", align_corners=False)
    x = x.expand(-1, in_chans, -1, -1)
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent (model in eval mode)."""
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += (model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum().item()
    return 100.0 * correct / len(y)


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero padding), one offset per image."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    off = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    return torch.stack([padded[i, :, oy : oy + h, ox : ox + w] for i, (oy, ox) in enumerate(off.tolist())])


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 32,
    weight_decay: float = 0.05,
    seed: int = 0,
    max_shift: int = 0,
    warmup_steps: int = 0,
    on_step: Optional[Callable[[float], None]] = None,
) -> list[float]:
    """Train with AdamW and a cosine schedule; deterministic given ``seed``. Returns the mean loss per epoch.

    ``max_shift`` translates inputs randomly by up to that many pixels (at the input resolution).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(y) / batch_size)
    total = max(1, epochs * steps_per_epoch)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total - warmup_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses = []
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=gen)
        epoch_loss = 0.0
        for i in range(0, len(y), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(_shift(x[idx], max_shift, gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            epoch_loss += loss.item() * len(idx)
            if on_step is not None:
                on_step(loss.item())
        losses.append(epoch_loss / len(y))
    model.eval()
    return losses


@torch.no_grad()
def images_per_second(model: nn.Module, x: torch.Tensor, batch_size: int = 128, min_time: float = 0.3) -> float:
    """Inference throughput on ``x`` (first ``batch_size`` images, repeated for at least ``min_time`` seconds)."""
    model.eval()
    batch = x[:batch_size]
    model(batch)  # warm-up
    n, start = 0, time.perf_counter()
    while True:
        model(batch)
        n += len(batch)
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return n / elapsed


def train_digits_base(
    out: Union[str, Path], epochs: int = 40, seed: int = 0, progress: bool = True
) -> tuple[float, list[float]]:
    """Train the shipped digits base from scratch and save it as safetensors.

    The architecture is the ``vit_digits_patch4_32`` variant (a ViT with ``embed_dim=64``, 4 blocks, 32 px,
    patch 4, 1 channel, 10 classes); built with ``pretrained=False``, so this never reads the shipped weights.

    Args:
        out: Output ``.safetensors`` path.
        epochs: Training epochs over the 1,437 training images.
        seed: Seed of the init and the data order (the split is fixed).
        progress: Show a progress bar.

    Returns:
        Held-out accuracy (percent) and the loss per epoch.
    """
    import safetensors.torch

    split = load_digits_split()
    torch.manual_seed(seed)
    register_demo_variants()
    model = timm.create_model(BASE_VARIANT, pretrained=False)
    x = render(split.train_x, (32, 32), model)
    bar = _progress(epochs * math.ceil(len(split.train_y) / 64), "train digits base", progress)
    losses = train(
        model,
        x,
        split.train_y,
        epochs,
        lr=2e-3,
        batch_size=64,
        seed=seed,
        max_shift=2,
        warmup_steps=50,
        on_step=lambda loss: bar.update(1),
    )
    bar.close()
    acc = evaluate(model, render(split.test_x, (32, 32), model), split.test_y)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(out),
        metadata={"arch": BASE_VARIANT, "held_out_accuracy": f"{acc:.2f}", "epochs": str(epochs), "seed": str(seed)},
    )
    return acc, losses


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)
