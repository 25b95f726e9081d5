"""One padding helper and one refusal: every family pads a non-multiple input through ``core.padding.pad_to_multiple``
and, with padding off, refuses it through ``check_multiple`` with the one ``InputNotDivisibleError`` that names the
size, the multiple and the nearest sizes that work."""

from __future__ import annotations

import pytest
import timm
import torch
from test_families import SETUP

import timm_anysize
from timm_anysize.core.cache import PosEmbedCache, cached_or_inline
from timm_anysize.core.padding import check_multiple, pad_to_multiple

SWIN = dict(embed_dim=32, depths=(2, 2), num_heads=(1, 2), window_size=4)

# family: (timm model, its kwargs, an input off the multiple, the multiple, the nearest sizes the message names)
CASES = {
    "vit": ("test_vit", dict(img_size=64), (70, 64), (16, 16), "64x64 or 80x64"),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(SWIN, img_size=64, dynamic_img_size=True),
        (61, 70),
        (4, 4),
        "60x68 or 64x72",
    ),
    "tnt": ("tnt_s_patch16_224", dict(SETUP["tnt"].model_args, img_size=64), (70, 64), (16, 16), "64x64 or 80x64"),
    "hiera": ("hiera_tiny_224", dict(img_size=64), (70, 96), (32, 32), "64x96 or 96x96"),
    "gcvit": ("gcvit_xxtiny", dict(img_size=64, embed_dim=16, mlp_ratio=1.0), (64, 70), (32, 32), "64x64 or 64x96"),
}


@pytest.mark.parametrize("family", list(CASES))
def test_a_non_multiple_input_is_refused_with_padding_off_and_runs_with_it_on(family):
    arch, kwargs, size, multiple, nearest = CASES[family]
    x = torch.randn(1, 3, *size)
    strict = timm_anysize.enable_dynamic(timm.create_model(arch, **kwargs).eval(), pad=False)
    with torch.no_grad(), pytest.raises(timm_anysize.InputNotDivisibleError) as err:
        strict(x)
    assert isinstance(err.value, ValueError)
    assert (err.value.size, err.value.multiple) == (size, multiple)
    message = str(err.value)
    assert f"input {size[0]}x{size[1]} is not a multiple of" in message and f"{multiple[0]}x{multiple[1]}" in message
    assert f"nearest sizes that work: {nearest};" in message and "enable_dynamic(pad=True)" in message
    padded = timm_anysize.enable_dynamic(timm.create_model(arch, **kwargs).eval(), pad=True)
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
