"""One padding helper and one refusal: every family pads a non-multiple input through ``core.padding.pad_to_multiple``
and, with padding off, refuses it through ``check_multiple`` with the one ``InputNotDivisibleError`` that names the
size, the multiple and the nearest sizes that work."""

from __future__ import annotations

import pytest
import timm
import torch

import timm_anysize
from timm_anysize.core.cache import PosEmbedCache, cached_or_inline
from timm_anysize.core.family import Family
from timm_anysize.core.padding import check_multiple, pad_to_multiple
from timm_anysize.families import FAMILIES


def _off_multiple(family: Family) -> tuple[int, int]:
    """An input one pixel taller and one narrower than the tiny model's own size: both sides off its
    ``tiny.multiple``."""
    return (family.tiny.img_size + 1, family.tiny.img_size - 1)


def _nearest(size: tuple[int, int], multiple: int) -> str:
    """The two sizes the message names: each side down, then up, to the multiple."""
    down = [s // multiple * multiple for s in size]
    up = [-(-s // multiple) * multiple for s in size]
    return f"{down[0]}x{down[1]} or {up[0]}x{up[1]}"


# Every row that enable_dynamic makes run at any size and whose tiny model needs a multiple with ``pad: false``, the
# patch embedding checking it (an ``unpadded_multiple`` is checked by a variant's input guard instead:
# tests/test_runtime_sizes.py).
PADDED = [
    f
    for f in FAMILIES
    if f.dynamic == "cached" and f.tiny is not None and f.tiny.multiple > 1 and f.unpadded_multiple is None
]


@pytest.mark.parametrize("family", PADDED, ids=lambda f: f.name)
def test_a_non_multiple_input_is_refused_with_padding_off_and_runs_with_it_on(family):
    tiny = family.tiny
    kwargs = dict(tiny.model_args, **({"img_size": tiny.img_size} if tiny.img_size_arg else {}))
    size, multiple = _off_multiple(family), (tiny.multiple, tiny.multiple)
    nearest = _nearest(size, tiny.multiple)
    arch = family.example
    x = torch.randn(1, 3, *size)
    # the family's constructor arguments for any size (EVA builds its RoPE for it)
    strict = timm.create_model(arch, **kwargs, **family.dynamic_kwargs(True, pad=False)).eval()
    strict = timm_anysize.enable_dynamic(strict, pad=False)
    with torch.no_grad(), pytest.raises(timm_anysize.InputNotDivisibleError) as err:
        strict(x)
    assert isinstance(err.value, ValueError)
    assert (err.value.size, err.value.multiple) == (size, multiple)
    message = str(err.value)
    assert f"input {size[0]}x{size[1]} is not a multiple of" in message and f"{multiple[0]}x{multiple[1]}" in message
    assert f"nearest sizes that work: {nearest};" in message and "enable_dynamic(pad=True)" in message
    padded = timm.create_model(arch, **kwargs, **family.dynamic_kwargs(True, pad=True)).eval()
    padded = timm_anysize.enable_dynamic(padded, pad=True)
    with torch.no_grad():
        assert torch.isfinite(padded(x)).all()


def test_pad_to_multiple_pads_bottom_right_and_returns_the_input_when_whole():
    x = torch.randn(1, 3, 30, 64)
    out = pad_to_multiple(x, [16, 16])
    assert out.shape == (1, 3, 32, 64) and torch.equal(out[..., :30, :], x) and not out[..., 30:, :].any()
    whole = torch.randn(1, 3, 32, 64)
    assert pad_to_multiple(whole, [16, 16]) is whole
    always = pad_to_multiple(whole, [16, 16], always=True)
    assert always is not whole and torch.equal(always, whole)
    scripted = torch.jit.script(pad_to_multiple)
    assert torch.equal(scripted(x, [16, 16], False), out)


def test_check_multiple_names_size_multiple_and_nearest():
    check_multiple((64, 48), (16, 16))
    with pytest.raises(
        timm_anysize.InputNotDivisibleError,
        match=r"input 5x33 is not a multiple of the window 8x8 "
        r"and padding is off; nearest sizes that work: 8x32 or 8x40; resize or crop",
    ) as err:
        check_multiple((5, 33), (8, 8), what="the window")
    assert (err.value.size, err.value.multiple) == ((5, 33), (8, 8))


def test_cached_or_inline_caches_without_gradient_and_runs_inline_with_it():
    weight, cache = torch.ones(3, requires_grad=True), PosEmbedCache()
    with torch.no_grad():
        first = cached_or_inline(cache, ((2, 2),), weight, lambda: weight * 2)
        assert cached_or_inline(cache, ((2, 2),), weight, lambda: weight * 3) is first
    inline = cached_or_inline(cache, ((2, 2),), weight, lambda: weight * 2)
    assert inline.requires_grad and inline is not first and cache.info()["hits"] == 1
    assert cached_or_inline(None, ((2, 2),), weight.detach(), lambda: weight.detach() * 4).tolist() == [4.0] * 3
