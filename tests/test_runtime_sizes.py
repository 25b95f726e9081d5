"""Run-time input sizes (issue 21): an input below a model's smallest (its stem and stride chain), off its stem's
multiple, or, for a ``dynamic: false`` variant, other than its own raises the one documented
:class:`timm_anysize.InputSizeError` (:class:`timm_anysize.InputNotDivisibleError` for a multiple) before any layer
runs, naming the size and the nearest sizes that work; a stem that pads (``Family.stem_pad``: TResNet's 4x4 blocks)
pads to whole blocks with ``pad: true``. The cases come from the rows' ``tiny.min_input`` and ``tiny.multiple``."""

from __future__ import annotations

import pytest
import timm
import torch

import timm_anysize
from conftest import unique_name
from timm_anysize.core.family import TinyModel
from timm_anysize.core.spec import Size2
from timm_anysize.families import FAMILIES

# A CNN without a row of its own (the generic family), whose strides set its smallest input.
GENERIC = ("convnext_atto", TinyModel(dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)), min_input=32))


def _tiny(base: str, tiny: TinyModel, pad: bool = True, **spec) -> torch.nn.Module:
    """A tiny model (a row's ``example`` and ``tiny``) as a (dynamic) variant."""
    spec = {"model_args": tiny.model_args, "pad": pad, "img_size": tiny.img_size, **spec}
    if not tiny.img_size_arg:
        spec.pop("img_size")
    name = unique_name("rs")
    timm_anysize.register_variant(name, base=base, **spec)
    return timm.create_model(name).eval()


def _run(model: torch.nn.Module, h: int, w: int) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(1, model.pretrained_cfg["input_size"][0], h, w))


def _nearest_multiples(size: Size2, m: int) -> tuple[Size2, Size2]:
    """Each side down, then up, to a multiple of ``m``."""
    return (size[0] // m * m, size[1] // m * m), (-(-size[0] // m) * m, -(-size[1] // m) * m)


def _holes(tiny: TinyModel) -> list[Size2]:
    """The holes of issue 21 for a tiny model (raw RuntimeErrors from inside torch before): inputs below its smallest
    (both sides; one side, beside a long odd one) and, where it needs a multiple (checked with padding off), inputs
    off it."""
    n, m, own = tiny.min_input, tiny.multiple, tiny.img_size
    sizes = [(n // 2 + 1, n // 2 + 1), (n - 1, n - 1), (9 * n - 5, n - 1), (n - 1, 2 * n)]
    if m > 1:
        sizes += [(own + 1, own + 1), (own + m + 1, 2 * own + 1)]
    return sizes


# Every row (and the generic CNN) whose tiny model has a smallest input: checked with padding off where it also
# needs a multiple.
SMALLEST = [(f.name, f.example, f.tiny) for f in FAMILIES if f.dynamic and f.tiny is not None and f.tiny.min_input > 1]
SMALLEST.append(("generic", *GENERIC))


@pytest.mark.parametrize("base, tiny", [c[1:] for c in SMALLEST], ids=[c[0] for c in SMALLEST])
def test_small_or_non_dividing_inputs_raise_the_documented_error(base, tiny):
    smallest = tiny.min_input
    model = _tiny(base, tiny, pad=tiny.multiple == 1)
    for h, w in _holes(tiny):
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


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.stem_pad], ids=lambda f: f.name)
def test_a_padding_stem_pads_to_whole_blocks_with_pad_true(family):
    """A ``stem_pad`` row's stem (TResNet's 4x4 space-to-depth is a 4x4 patchify): with pad: true it pads
    bottom/right as the patch families pad to whole patches, equal to the zero-padded input; with pad: false a
    non-multiple is refused by name."""
    tiny = family.tiny
    m, own = tiny.multiple, tiny.img_size
    model = _tiny(family.example, tiny, pad=True)
    h, w = own + 2 * m - 2, own + 4 * m - 1
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        out = model(x)
        padded = model(torch.nn.functional.pad(x, (0, -w % m, 0, -h % m)))
    torch.testing.assert_close(out, padded)
    small = tiny.min_input // 2 - 1
    with pytest.raises(timm_anysize.InputSizeError, match=f"input {small}x{own} is smaller"):
        _run(model, small, own)
    strict = _tiny(family.example, tiny, pad=False)
    with pytest.raises(
        timm_anysize.InputNotDivisibleError, match=f"input {h}x{w} is not a multiple of {family.name}'s"
    ) as e:
        _run(strict, h, w)
    assert e.value.multiple == (m, m) and e.value.nearest == _nearest_multiples((h, w), m)


def test_a_static_variant_at_another_size_raises_the_documented_error():
    tiny = TinyModel()  # timm's test_vit at the default size
    model = _tiny("test_vit", tiny, dynamic=False)
    own = tiny.img_size
    assert torch.isfinite(_run(model, own, own)).all()
    with pytest.raises(timm_anysize.InputSizeError, match=f"runs at its own size {own}x{own} only") as e:
        _run(model, own + 16, own)
    assert e.value.nearest == ((own, own),)


def test_the_guard_stands_aside_under_torchscript():
    model = _tiny(*GENERIC)
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
    model = _tiny(family.example, tiny)
    n = tiny.min_input
    assert timm_anysize.input_limits(model).minimum == (n, n)
    assert torch.isfinite(_run(model, n, n)).all()
    if n > 1:
        with pytest.raises(timm_anysize.InputSizeError):
            _run(model, n - 1, n - 1)
    if tiny.multiple > 1:
        strict = _tiny(family.example, tiny, pad=False)
        own = tiny.img_size
        with pytest.raises(timm_anysize.InputNotDivisibleError):
            _run(strict, own + 1, own)
