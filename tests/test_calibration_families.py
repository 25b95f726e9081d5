"""Calibration on the tiny model of every family (the rows of :data:`timm_anysize.families.FAMILIES`): a variant at
another geometry of a seeded source checkpoint learns from that checkpoint at its own geometry.

Well-posed and cheap: the images are one fixed smooth image (copies of it), so every step sees the same batch,
and the source's head is made confident (scaled) so the logits disagree measurably. The check is the one gradient
descent guarantees: an AdamW step at a small rate lowers the distillation loss (KL of the logits) of that batch --
the training loss of the second step below the first's. The rate is small because Adam moves every weight by about
the rate whatever its gradient's size: near agreement, on the full-size rows, a larger one overshoots (measured:
1e-4 and 1e-5 raised the loss on several rows). Whether the held-aside agreement rises over many steps on real
images is tests/test_calibration.py's check (the digits).
"""

from __future__ import annotations

import pytest
import timm
import torch

import timm_anysize
from conftest import save_checkpoint, unique_name
from timm_anysize.core.family import Family
from timm_anysize.families import FAMILIES

ROWS = [f for f in FAMILIES if f.tiny is not None]
STEPS = 2


def _target(fam: Family) -> dict:
    """Another geometry of the tiny model: one step larger, or (a family bound to one input size) one channel."""
    tiny = fam.tiny
    if "img_larger" in fam.unsupported:
        return {"img_size": tiny.img_size, "in_chans": 1}
    return {"img_size": tiny.img_size + tiny.step}


def _image(size: int) -> torch.Tensor:
    """One smooth colour image in [0, 1] (blurred noise), four copies."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 8, 8, generator=gen)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return x.expand(4, -1, -1, -1).contiguous()


@pytest.mark.parametrize("fam", ROWS, ids=lambda f: f.name)
def test_calibration_lowers_the_distillation_loss_on_every_family(fam: Family, tmp_path):
    tiny = fam.tiny
    torch.manual_seed(0)
    base = timm.create_model(
        fam.example, num_classes=10, **tiny.model_args, **({"img_size": tiny.img_size} if tiny.img_size_arg else {})
    )
    with torch.no_grad():  # non-trivial weights everywhere, and a confident head: the logits then disagree
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        heads = base.get_classifier()
        for head in heads if isinstance(heads, (tuple, list, torch.nn.ModuleList)) else [heads]:
            for p in head.parameters():
                p.mul_(10)
    path = save_checkpoint(base, tmp_path / "w.safetensors")
    target = _target(fam)
    name = timm_anysize.register_variant(
        unique_name("calfam"),
        base=fam.example,
        model_args=tiny.model_args,
        num_classes=10,
        pretrained={"file": str(path), "img_size": tiny.img_size, "num_classes": 10},
        **target,
    )
    model = timm.create_model(name, pretrained=True)
    images = _image(max(tiny.img_size, target["img_size"]))
    report = timm_anysize.calibrate(model, images, steps=STEPS, batch_size=2, lr=1e-6, held_out=2, progress=False)
    (g,) = report.geometries
    assert report.target == "logits" and len(report.losses) == STEPS
    assert report.losses[1] < report.losses[0], report.losses
    assert report.loss_before[g] > 0  # a disagreement to lower
