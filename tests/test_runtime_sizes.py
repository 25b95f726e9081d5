"""Run-time input sizes (issue 21): an input below a model's smallest (its stem and stride chain), off its stem's
multiple, or, for a ``dynamic: false`` variant, other than its own raises the one documented
:class:`timm_anysize.InputSizeError` (:class:`timm_anysize.InputNotDivisibleError` for a multiple) before any layer
runs, naming the size and the nearest sizes that work; TResNet pads to whole 4x4 blocks with ``pad: true``."""

from __future__ import annotations

import pytest
import timm
import torch

import timm_anysize
from conftest import unique_name
from timm_anysize.families import FAMILIES

ROWS = {f.name: f for f in FAMILIES}
CONVNEXT_TINY = dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1))


def _tiny(family: str, pad: bool = True, **spec) -> torch.nn.Module:
    """The family's tiny model as a (dynamic) variant."""
    if family == "convnext":
        base, args, size = "convnext_atto", CONVNEXT_TINY, 64
    else:
        row = ROWS[family]
        base, args, size = row.example, row.tiny.model_args, row.tiny.img_size
    spec = {"model_args": args, "pad": pad, "img_size": size, **spec}
    if family != "convnext" and not ROWS[family].tiny.img_size_arg:
        spec.pop("img_size")
    name = unique_name("rs")
    timm_anysize.register_variant(name, base=base, **spec)
    return timm.create_model(name).eval()


def _run(model: torch.nn.Module, h: int, w: int) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(1, model.pretrained_cfg["input_size"][0], h, w))


# The holes of issue 21: raw RuntimeErrors from inside torch before; (family, pad, sizes refused, smallest).
HOLES = [
    ("pit", True, [(9, 9)], 16),
    ("volo", True, [(11, 11)], 15),
    ("convnext", True, [(15, 15), (283, 31)], 32),
    ("twins", True, [(31, 31), (20, 64)], 32),
    ("tresnet", False, [(70, 70), (79, 155), (18, 18)], 20),
]


@pytest.mark.parametrize("family, pad, sizes, smallest", HOLES, ids=[h[0] for h in HOLES])
def test_small_or_non_dividing_inputs_raise_the_documented_error(family, pad, sizes, smallest):
    model = _tiny(family, pad=pad)
    for h, w in sizes:
        with pytest.raises(timm_anysize.InputSizeError, match=f"input {h}x{w} .*nearest sizes that work: ") as e:
            _run(model, h, w)
        assert e.value.size == (h, w) and e.value.nearest
        assert isinstance(e.value, ValueError)
        for nh, nw in e.value.nearest:  # the sizes it names do work
            assert torch.isfinite(_run(model, nh, nw)).all()
    assert timm_anysize.input_limits(model).minimum == (smallest, smallest)
    assert torch.isfinite(_run(model, smallest, smallest)).all()
    with pytest.raises(timm_anysize.InputSizeError, match=f"smallest input this model runs at, {smallest}x"):
        _run(model, smallest - 1, smallest)


def test_tresnet_pads_to_whole_blocks_with_pad_true():
    """TResNet's 4x4 space-to-depth is a 4x4 patchify: with pad: true it pads bottom/right as the patch families
    pad to whole patches, equal to the zero-padded input; with pad: false a non-multiple is refused by name."""
    model = _tiny("tresnet", pad=True)
    x = torch.randn(1, 3, 70, 79)
    with torch.no_grad():
        out = model(x)
        padded = model(torch.nn.functional.pad(x, (0, 1, 0, 2)))
    torch.testing.assert_close(out, padded)
    with pytest.raises(timm_anysize.InputSizeError, match="input 9x64 is smaller"):
        _run(model, 9, 64)
    strict = _tiny("tresnet", pad=False)
    with pytest.raises(timm_anysize.InputNotDivisibleError, match="input 70x79 is not a multiple of tresnet's") as e:
        _run(strict, 70, 79)
    assert e.value.multiple == (4, 4) and e.value.nearest == ((68, 76), (72, 80))


def test_a_static_variant_at_another_size_raises_the_documented_error():
    row = ROWS["vit"]
    model = _tiny("vit", dynamic=False)
    own = row.tiny.img_size
    assert torch.isfinite(_run(model, own, own)).all()
    with pytest.raises(timm_anysize.InputSizeError, match=f"runs at its own size {own}x{own} only") as e:
        _run(model, own + 16, own)
    assert e.value.nearest == ((own, own),)


def test_the_guard_stands_aside_under_torchscript():
    model = _tiny("convnext")
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(torch.ones(1, 3, 64, 64)), _run_ones(model))


def _run_ones(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.ones(1, 3, 64, 64))


DYNAMIC = [f for f in FAMILIES if f.dynamic and f.tiny is not None]


@pytest.mark.parametrize("family", DYNAMIC, ids=lambda f: f.name)
def test_the_rows_smallest_input_and_multiple(family):
    """``tiny.min_input`` (pad: true) is what input_limits finds and runs, one less is refused; with pad: false an
    input one past the variant's size is refused as not a multiple of ``tiny.multiple`` (where it is one)."""
    tiny = family.tiny
    model = _tiny(family.name)
    n = tiny.min_input
    assert timm_anysize.input_limits(model).minimum == (n, n)
    assert torch.isfinite(_run(model, n, n)).all()
    if n > 1:
        with pytest.raises(timm_anysize.InputSizeError):
            _run(model, n - 1, n - 1)
    if tiny.multiple > 1:
        strict = _tiny(family.name, pad=False)
        own = tiny.img_size
        with pytest.raises(timm_anysize.InputNotDivisibleError):
            _run(strict, own + 1, own)
