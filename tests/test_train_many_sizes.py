"""Training at many sizes with timm's own scheduled-resolution loader (issue 31, item 1).

For the tiny model of every family with a dynamic forward (the rows of :data:`timm_anysize.families.FAMILIES`), a
variant is trained the way timm's train.py does with ``--train-img-sizes A B C --train-size-schedule progressive``:
``timm.data.create_loader(..., input_size_choices=[A, B, C], batch_choice_schedule="progressive")``, one size per
epoch, one SGD step each, from the family's smallest run-time size to about twice its own. Each step's forward
equals a ``dynamic: false`` variant built for that batch's size with the step's weights (within 1e-5); gradients
reach the model's one stored position embedding or table at every size; the per-size caches stay bounded. Under
torchrun (gloo, 2 ranks, DDP as train.py wraps a model) every family's tiny variant trains over its sizes as one
process on the whole batch would.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.data import ImageDataset, create_loader

import timm_anysize
from conftest import run_torchrun, tiny_arch, unique_name
from timm_anysize.core.cache import PosEmbedCache
from timm_anysize.core.family import Family, tensor_layouts
from timm_anysize.families import FAMILIES

DYNAMIC = [f for f in FAMILIES if f.supports_dynamic and f.tiny is not None]
STEPS = 1  # batches per size (the weights a size is compared at were trained at the sizes before)

BATCH = 2


def train_sizes(fam: Family) -> list[int]:
    """The row's ``train_sizes``, or three square sizes, multiples of the family's test step (sizes a model can also
    be built for): the smallest at or above its smallest run-time input (``TinyModel.min_input``, what
    ``input_limits`` finds), the largest about twice its own size (at least two steps above the smallest)."""
    tiny = fam.tiny
    if tiny.train_sizes:
        return list(tiny.train_sizes)
    lo = tiny.step * math.ceil(max(tiny.min_input, 1) / tiny.step)
    hi = max(tiny.step * round(2 * tiny.img_size / tiny.step), lo + 2 * tiny.step)
    mid = lo + tiny.step * math.ceil((hi - lo) / (2 * tiny.step))
    return [lo, mid, hi]


def seeded_checkpoint(fam: Family, path: str) -> dict[str, torch.Tensor]:
    """Saves to ``path`` the family's tiny model at its own size with seeded, perturbed weights (no zero position
    embeddings or tables); returns its parameters."""
    tiny = fam.tiny
    size = {"img_size": tiny.img_size} if tiny.img_size_arg else {}
    torch.manual_seed(0)
    base = timm.create_model(tiny_arch(fam), **size, **tiny.model_args)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch.save(base.state_dict(), path)
    return {k: p.detach() for k, p in base.named_parameters()}


def seeded_variant(fam: Family, tmp_path) -> tuple[str, str]:
    """A dynamic variant of the family's tiny model at its own size loading :func:`seeded_checkpoint`'s weights; its
    name and the checkpoint's path."""
    tiny = fam.tiny
    size = {"img_size": tiny.img_size} if tiny.img_size_arg else {}
    path = str(tmp_path / "seed.pt")
    seeded_checkpoint(fam, path)
    name = timm_anysize.register_variant(
        unique_name("ms"), base=tiny_arch(fam), model_args=tiny.model_args, pretrained={"file": path, **size}, **size
    )
    return name, path


def built_for(fam: Family, size: int, path: str) -> str:
    """A ``dynamic: false`` variant at ``size`` of the same weights (source size: the tiny model's own)."""
    tiny = fam.tiny
    if not tiny.img_size_arg:  # a CNN that runs at any size as its convolutions do: built once for all
        return timm_anysize.register_variant(
            unique_name("ms"), base=tiny_arch(fam), model_args=tiny.model_args, pretrained={"file": path}
        )
    return timm_anysize.register_variant(
        unique_name("ms"),
        base=tiny_arch(fam),
        model_args=tiny.model_args,
        img_size=size,
        dynamic=False,
        pretrained={"file": path, "img_size": tiny.img_size},
    )


def keep_windows(reference: torch.nn.Module, model: torch.nn.Module) -> None:
    """Sets the windows of ``reference`` (built for another size) to those ``model`` keeps from its own size, through
    timm's ``set_input_size``: a window timm shrank to a stage's grid at the variant's size stays shrunk at every
    size the variant runs (Swin's last stage: 2 at 64 px, 4 in a model built at 128 px)."""
    kept = dict(model.named_modules())
    for name, module in reference.named_modules():
        window = getattr(kept.get(name), "window_size", None)
        if window is not None and hasattr(module, "set_input_size") and tuple(module.window_size) != tuple(window):
            grid = getattr(module, "input_resolution", None) or module.feat_size
            module.set_input_size(feat_size=tuple(grid), window_size=tuple(window))


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Sets every dropout's rate to 0: a rate timm fixes in code (SwinV2-CR's position-bias MLP drops 12.5 % of its
    hidden units, no argument turns it off) draws a mask of the windows' shape, which differs where the variant masks
    a window that timm shrinks; the same draws would not then be the same mask."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def caches(model: torch.nn.Module) -> list[PosEmbedCache]:
    """Every per-size cache the dynamic path keeps on the model's modules."""
    found = []
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, PosEmbedCache):
                found.append(value)
            elif isinstance(value, dict):
                found.extend(v for v in value.values() if isinstance(v, PosEmbedCache))
    return found


@pytest.mark.parametrize("fam", DYNAMIC, ids=lambda f: f.name)
def test_scheduled_sizes_train_as_models_built_for_each_size(fam, image_folder, tmp_path, caplog):
    sizes = train_sizes(fam)
    name, path = seeded_variant(fam, tmp_path)
    model = without_dropout(timm.create_model(name, pretrained=True).train())
    assert timm_anysize.is_dynamic(model)
    params = {n: p for n, p in model.named_parameters()}
    stored = sorted(tensor_layouts(fam, params))  # the geometry-dependent tensors: one each, whatever the size
    compared = sizes if fam.tiny.train_built is None else list(fam.tiny.train_built)
    assert set(compared) <= set(sizes) and (compared == sizes or fam.tiny.train_note), fam.tiny
    references = {s: built_for(fam, s, path) for s in compared}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = create_loader(
        ImageDataset(image_folder),
        input_size=(3, fam.tiny.img_size, fam.tiny.img_size),
        batch_size=BATCH,
        is_training=True,
        input_size_choices=sizes,
        batch_choice_schedule="progressive",
        batch_schedule_epochs=len(sizes),
        batch_schedule_spread=0.0,
        batch_schedule_random_mix=0.0,
        num_batches=STEPS,
        use_prefetcher=False,
        num_workers=0,
        device=torch.device("cpu"),
    )
    seen, reached = [], dict.fromkeys(stored, 0.0)
    for epoch in range(len(sizes)):
        loader.batch_sampler.set_epoch(epoch)
        for x, target in loader:
            first_at_size = x.shape[-1] not in seen and x.shape[-1] in references
            seen.append(x.shape[-1])
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            with torch.random.fork_rng(devices=[]):  # the same stochastic depth draws as the reference's
                torch.manual_seed(len(seen))
                out = model(x)
            if first_at_size:  # the weights trained at the sizes before; one build per size keeps the test fast
                reference = without_dropout(
                    timm.create_model(
                        references[x.shape[-1]], pretrained=True, pretrained_cfg_overlay={"state_dict": weights}
                    ).train()
                )
                keep_windows(reference, model)
                with torch.no_grad(), torch.random.fork_rng(devices=[]):
                    torch.manual_seed(len(seen))
                    expected = reference(x)
                torch.testing.assert_close(
                    out, expected, rtol=0, atol=1e-5, msg=lambda m, s=tuple(x.shape): f"{s}: {m}"
                )
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(out, target).backward()
            for key in stored:  # the one stored tensor is in the graph at every size (zero_grad left None)
                assert params[key].grad is not None, (key, x.shape)
                reached[key] += params[key].grad.abs().sum()
            optimizer.step()
    assert seen == [s for s in sizes for _ in range(STEPS)]
    # and gets a gradient (not at every size: a 1x1 attention grid's softmax does not depend on its bias)
    assert all(v > 0 for v in reached.values()), reached
    assert {n: p for n, p in model.named_parameters()} == params  # the same tensors: no per-size copies
    # Inference at every size, twice: the caches fill on the first pass, within their bound; the second pass is all
    # hits (what each size needs is kept, once).
    model.eval()
    trained_misses = sum(c.info()["misses"] for c in caches(model))
    with caplog.at_level(logging.DEBUG, logger="timm_anysize"), torch.no_grad():
        for s in sizes:
            model(torch.randn(1, 3, s, s))
        before = [c.info() for c in caches(model)]
        first_pass = len(caplog.records)
        for s in sizes:
            model(torch.randn(1, 3, s, s))
    after = [c.info() for c in caches(model)]
    for first, second in zip(before, after):
        assert first["size"] <= first["maxsize"] and second["misses"] == first["misses"], (first, second)
    misses = [r.getMessage() for r in caplog.records if r.name == "timm_anysize.core.cache"]
    assert len(misses) == sum(c["misses"] for c in after) - trained_misses and all("hit rate" in m for m in misses)
    # the caches of what depends on sizes only (window masks, relative coordinates; shared by every model) hit too
    sizes_misses = [r.getMessage() for r in caplog.records[first_pass:] if r.name == "timm_anysize.core.size_cache"]
    assert sizes_misses == []


DDP_SCRIPT = """
import json, os, sys, timm, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[3])
import anysize_tiny_models  # the rows' small TinyModel.base entrypoints, as the suite registers them
import timm_anysize
rows, out = json.load(open(sys.argv[1])), sys.argv[2]
distributed = "RANK" in os.environ
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
for row in rows:
    size = {"img_size": row["img_size"]} if row["img_size"] else {}
    name = timm_anysize.register_variant(
        "ddp_" + row["family"], base=row["arch"], model_args=row["model_args"],
        pretrained={"file": row["checkpoint"], **size}, **size,
    )
    model = timm.create_model(name, pretrained=True).train()
    assert timm_anysize.is_dynamic(model), name
    for module in model.modules():  # no random draws: each rank sees another part of the batch
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    ddp = torch.nn.parallel.DistributedDataParallel(model) if distributed else model  # as timm's train.py wraps it
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    a, b, c = row["sizes"]
    for step, hw in enumerate([a, b, c, a]):  # a schedule of sizes, and back
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(4, 3, hw, hw, generator=gen)
        part = slice(rank * 4 // world, (rank + 1) * 4 // world)  # each rank its share of the global batch
        optimizer.zero_grad()
        logits = ddp(x[part])
        y = torch.randint(0, logits.shape[-1], (4,), generator=gen)
        torch.nn.functional.cross_entropy(logits, y[part]).backward()
        optimizer.step()
    batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    params = {k: p.detach() for k, p in model.named_parameters()}
    torch.save(dict(params=params, batch_norm=batch_norm), f"{out}.{row['family']}.{rank}")
if distributed:
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo can abort at interpreter shutdown (see tests/test_flexi.py); the work is done and written
"""


def test_ddp_ranks_train_every_family_at_scheduled_sizes_as_one_process_with_the_global_batch(tmp_path):
    """Under torchrun (gloo, 2 ranks, DDP wrapped as timm's train.py wraps a model) the tiny variant of every dynamic
    family trains over a schedule of its sizes, each rank on half of every global batch: no parameter goes unused at
    any size (DDP would stop), both ranks hold the same parameters, those of one process on the whole batch (up to
    the order of the float sums) where no batch norm sees the batch split, and training moved them."""
    rows, seeds = [], {}
    for fam in DYNAMIC:
        checkpoint = tmp_path / f"{fam.name}.pt"
        seeds[fam.name] = seeded_checkpoint(fam, str(checkpoint))
        tiny = fam.tiny
        rows.append(
            dict(
                family=fam.name,
                arch=tiny_arch(fam),
                model_args=tiny.model_args,
                img_size=tiny.img_size if tiny.img_size_arg else None,
                checkpoint=str(checkpoint),
                sizes=train_sizes(fam),
            )
        )
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "train.py").write_text(DDP_SCRIPT)
    tests = str(Path(__file__).resolve().parent)
    args = [str(tmp_path / "train.py"), str(tmp_path / "rows.json")]
    one = subprocess.run(
        [sys.executable, *args, str(tmp_path / "one"), tests],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    run_torchrun(*args, str(tmp_path / "two"), tests, timeout=600)
    for fam in DYNAMIC:
        single, rank0, rank1 = (
            torch.load(tmp_path / f"{run}.{fam.name}.{rank}", weights_only=True)
            for run, rank in (("one", 0), ("two", 0), ("two", 1))
        )
        batch_norm, (single, rank0, rank1) = single["batch_norm"], (r["params"] for r in (single, rank0, rank1))
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), fam.name  # DDP's averaged gradients
        assert any(not torch.equal(single[k], seeds[fam.name][k]) for k in single), fam.name
        if batch_norm:  # the statistics of each rank's half batch: another function of the weights
            continue
        # Float sums in another order differ by 3e-7 at most after four steps (Hiera: 3e-5, its gradients 2e-6 apart
        # grow over the steps); gradients summed rather than averaged move them further (BEiT's class token by 7e-4)
        for k in single:
            torch.testing.assert_close(
                rank0[k], single[k], rtol=0, atol=1e-4, msg=lambda m, k=k, f=fam.name: f"{f} {k}: {m}"
            )
