"""Swin at any input size: shifted-window masks checked against the definition (real tokens attend exactly to the
real tokens of their shifted window, never across a wrap-around, never to padding), and timm's outputs kept bit for
bit wherever no padding is needed."""

from __future__ import annotations

import itertools

import pytest
import timm
import torch

import timm_anysize
from timm_anysize.families.swin import shifted_window_mask

SWIN = dict(embed_dim=32, depths=(2, 2), num_heads=(1, 2), window_size=4)


def allowed_by_definition(size, window, shift):
    """Shifted windows without wrap-around: real positions i, j may attend iff (i + s) // ws agrees on both axes."""
    (h, w), (wh, ww), (sh, sw) = size, window, shift
    pos = [(i, j) for i in range(h) for j in range(w)]
    key = torch.tensor([((i + sh) // wh, (j + sw) // ww) for i, j in pos])
    return (key[:, None, :] == key[None, :, :]).all(-1)


def allowed_by_mask(mask, size, padded, window, shift, roll_first=False):
    """Map a [windows, area, area] mask back to real positions in original coordinates.

    The mask covers the padded map rolled by -shift: padded then rolled (ours, the original Swin's), or with
    ``roll_first`` rolled over the real size and then padded (timm 1.0.31).
    """
    (h, w), (hp, wp), (wh, ww), (sh, sw) = size, padded, window, shift

    def original(r, c):  # the real position a cell of the rolled map holds, or None for padding
        if roll_first:
            return ((r + sh) % h, (c + sw) % w) if r < h and c < w else None
        i, j = (r + sh) % hp, (c + sw) % wp
        return (i, j) if i < h and j < w else None

    allowed = torch.zeros(h * w, h * w, dtype=torch.bool)
    n = 0
    for bi in range(hp // wh):
        for bj in range(wp // ww):
            cells = [original(bi * wh + a, bj * ww + b) for a in range(wh) for b in range(ww)]
            for (p, o1), (q, o2) in itertools.product(enumerate(cells), repeat=2):
                if o1 is not None and o2 is not None:
                    allowed[o1[0] * w + o1[1], o2[0] * w + o2[1]] = mask is None or mask[n, p, q] == 0
            n += 1
    return allowed


@pytest.mark.parametrize("size", [(8, 8), (7, 8), (6, 5), (12, 12), (10, 13), (3, 3)])
@pytest.mark.parametrize("shift", [(0, 0), (2, 2)])
def test_masks_match_the_definition_of_shifted_windows(size, shift):
    window = (4, 4)
    padded = tuple(-(-s // 4) * 4 for s in size)
    mask = shifted_window_mask(size, padded, window, shift)
    assert torch.equal(allowed_by_mask(mask, size, padded, window, shift), allowed_by_definition(size, window, shift))


def test_timm_mask_lets_opposite_edges_attend_where_padding_is_short_of_the_shift():
    """Why the Swin families get their own window attention: timm rolls before padding (as of timm 1.0.31)."""
    block = (
        timm.create_model(
            "swin_tiny_patch4_window7_224", **dict(SWIN, window_size=7), img_size=56, dynamic_img_size=True
        )
        .layers[0]
        .blocks[1]
    )
    H = W = 12  # padded to 14: 2 rows of padding, shift 3
    rolled = torch.roll(torch.zeros(1, H, W, 1), (-3, -3), (1, 2))
    timm_mask = block.get_attn_mask(torch.nn.functional.pad(rolled, (0, 0, 0, 2, 0, 2)))
    timm_allowed = allowed_by_mask(timm_mask, (H, W), (14, 14), (7, 7), (3, 3), roll_first=True)
    assert not torch.equal(timm_allowed, allowed_by_definition((H, W), (7, 7), (3, 3)))


@pytest.mark.parametrize("arch", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "swinv2_cr_tiny_224"])
def test_bit_identical_to_timm_where_no_padding_is_needed(arch):
    torch.manual_seed(0)
    reference = timm.create_model(arch, **SWIN, img_size=64, dynamic_img_size=True).eval()
    ours = timm_anysize.enable_dynamic(timm.create_model(arch, **SWIN, img_size=64, dynamic_img_size=True).eval())
    ours.load_state_dict(reference.state_dict())
    with torch.no_grad():
        for hw in [(64, 64), (32, 96), (128, 64)]:  # every stage a multiple of the window
            x = torch.randn(2, 3, *hw)
            assert torch.equal(ours(x), reference(x)), hw


@pytest.mark.parametrize("pad", [True, False])
def test_any_size_with_and_without_padding(pad):
    model = timm_anysize.enable_dynamic(
        timm.create_model("swin_tiny_patch4_window7_224", **SWIN, img_size=64, dynamic_img_size=True).eval(), pad=pad
    )
    with torch.no_grad():
        assert model(torch.randn(1, 3, 72, 52)).shape == (1, 1000)
        if pad:
            for hw in [(61, 70), (61, 77), (3, 5)]:  # (61, 77): a stage of one window needs no copy
                assert model(torch.randn(1, 3, *hw)).shape == (1, 1000)
        else:
            with pytest.raises(ValueError, match="not a multiple of the patch 4x4 and padding is off"):
                model(torch.randn(1, 3, 61, 70))
