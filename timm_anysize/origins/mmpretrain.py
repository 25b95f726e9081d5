"""MMPretrain (MMClassification) classifiers: ViT, DeiT (two extra tokens) and Swin, ``backbone.`` + ``head.`` keys,
usually inside a ``{'meta': ..., 'state_dict': ...}`` wrapper (unwrapped by :mod:`timm_anysize.origins`).

MMPretrain's Swin merges patches with ``nn.Unfold``, whose channel order (``c, dh, dw``) differs from timm's
(``dw, dh, c``): the merging norm and reduction are permuted. Its stage ``s`` ends with the merging that timm puts
at the start of stage ``s + 1``.
"""

from __future__ import annotations

import torch

from timm_anysize.origins.mapping import Conversion, Drop, Layout, Rename

__all__ = ["LAYOUTS"]

_P = r"(?P<p>weight|bias)"
_L = r"backbone\.layers\.(?P<i>\d+)\."


def _vit_finish(conv: Conversion, config: dict) -> None:
    if any(k.startswith("head.layers.pre_logits") for k in conv.dropped):
        for key in [k for k in conv.state_dict if k.startswith("head")]:
            conv.dropped[conv.origin.pop(key).split("'")[1]] = "classifier behind head.layers.pre_logits"
            del conv.state_dict[key]
        conv.head_unusable = (
            "MMPretrain's head.layers.pre_logits (Linear + Tanh before the classifier) has no "
            "place in timm's ViT, so the classifier behind it cannot be carried over"
        )


VIT = Layout(
    name="mmpretrain.vit",
    origin="mmpretrain",
    families=("vit", "deit_distilled"),
    signature=(r"backbone\.cls_token", r"backbone\.layers\.0\.ln1\.weight"),
    rules=(
        Rename(r"backbone\.(?P<k>cls_token|pos_embed|dist_token)", "{k}"),
        Rename(r"backbone\.patch_embed\.projection\." + _P, "patch_embed.proj.{p}"),
        Rename(_L + r"ln(?P<n>[12])\." + _P, "blocks.{i}.norm{n}.{p}"),
        Rename(_L + r"attn\.(?P<m>qkv|proj)\." + _P, "blocks.{i}.attn.{m}.{p}"),
        Rename(_L + r"ffn\.layers\.0\.0\." + _P, "blocks.{i}.mlp.fc1.{p}"),
        Rename(_L + r"ffn\.layers\.1\." + _P, "blocks.{i}.mlp.fc2.{p}"),
        Rename(r"backbone\.(?:ln1|pre_norm_final)\." + _P, "norm.{p}"),
        Rename(r"head\.(?:layers\.head|fc)\." + _P, "head.{p}"),
        Rename(r"head\.layers\.head_dist\." + _P, "head_dist.{p}"),
        Drop(r"head\.layers\.pre_logits\." + _P, "representation layer (Linear + Tanh) timm's ViT does not have"),
    ),
    compat="mmpretrain",
    finish=_vit_finish,
)


def _unfold_to_timm(t: torch.Tensor) -> torch.Tensor:
    """Reorder the last dim from nn.Unfold's ``(c, dh, dw)`` to timm's ``(dw, dh, c)``."""
    c4 = t.shape[-1]
    return t.reshape(*t.shape[:-1], c4 // 4, 2, 2).movedim(-3, -1).transpose(-3, -2).reshape(t.shape)


_S = r"backbone\.stages\.(?P<s>\d+)\.blocks\.(?P<i>\d+)\."


def _blk(rest: str):
    return lambda m: f"layers.{m['s']}.blocks.{m['i']}.{rest.format(**m.groupdict())}"


SWIN = Layout(
    name="mmpretrain.swin",
    origin="mmpretrain",
    families=("swin",),
    signature=(r"backbone\.stages\.0\.blocks\.0\.attn\.w_msa\.qkv\.weight",),
    rules=(
        Rename(r"backbone\.patch_embed\.projection\." + _P, "patch_embed.proj.{p}"),
        Rename(r"backbone\.patch_embed\.norm\." + _P, "patch_embed.norm.{p}"),
        Rename(_S + r"(?P<m>norm1|norm2)\." + _P, _blk("{m}.{p}")),
        Rename(_S + r"attn\.w_msa\.(?P<m>qkv|proj)\." + _P, _blk("attn.{m}.{p}")),
        Rename(_S + r"attn\.w_msa\.relative_position_bias_table", _blk("attn.relative_position_bias_table")),
        Drop(_S + r"attn\.w_msa\.relative_position_index", "derived buffer: timm recomputes it from the window"),
        Rename(_S + r"ffn\.layers\.0\.0\." + _P, _blk("mlp.fc1.{p}")),
        Rename(_S + r"ffn\.layers\.1\." + _P, _blk("mlp.fc2.{p}")),
        Rename(
            r"backbone\.stages\.(?P<s>\d+)\.downsample\.(?P<m>norm|reduction)\." + _P,
            lambda m: f"layers.{int(m['s']) + 1}.downsample.{m['m']}.{m['p']}",
            transform=_unfold_to_timm,
            note="nn.Unfold channel order -> timm's",
        ),
        Rename(r"backbone\.norm3\." + _P, "norm.{p}"),
        Drop(r"backbone\.norm[012]\." + _P, "norm of an intermediate output (out_indices), unused by the classifier"),
        Rename(r"head\.fc\." + _P, "head.fc.{p}"),
    ),
    compat="mmpretrain",
)

LAYOUTS = (VIT, SWIN)
