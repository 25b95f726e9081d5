"""torchvision checkpoints: ``vit_*`` (VisionTransformer) and ``swin_*`` / ``swin_v2_*`` (SwinTransformer).

torchvision's ViT is timm's ViT under other names (LayerNorm eps 1e-6, exact GELU, fused ``in_proj`` q/k/v, class
token, final norm), except for the optional ``heads.pre_logits`` (Linear + Tanh before the head), which timm's ViT
has no place for. Its Swin stages are numbered ``features.{1,3,5,7}`` with the patch merging between them in
``features.{2,4,6}``; Swin V2 keeps one fused q/k/v bias whose key part it zeroes at every forward.
"""

from __future__ import annotations

import re

from timm_anysize.origins.mapping import Conversion, Drop, Layout, Rename, Split

__all__ = ["LAYOUTS"]

_P = r"(?P<p>weight|bias)"
_L = r"encoder\.layers\.encoder_layer_(?P<i>\d+)\."


def _vit_finish(conv: Conversion, config: dict) -> None:
    pre = [k for k, why in conv.dropped.items() if k.startswith("heads.pre_logits")]
    if pre:
        for key in [k for k in conv.state_dict if k.startswith("head.")]:
            conv.dropped[conv.origin.pop(key).split("'")[1]] = "classifier behind heads.pre_logits"
            del conv.state_dict[key]
        conv.head_unusable = (
            "torchvision's heads.pre_logits (a Linear + Tanh representation layer before the classifier) has no "
            "place in timm's ViT, so the classifier behind it cannot be carried over"
        )


VIT = Layout(
    name="torchvision.vit",
    origin="torchvision",
    families=("vit",),
    signature=(r"class_token", r"conv_proj\.weight", r"encoder\.pos_embedding"),
    rules=(
        Rename(r"class_token", "cls_token"),
        Rename(r"conv_proj\." + _P, "patch_embed.proj.{p}"),
        Rename(r"encoder\.pos_embedding", "pos_embed"),
        Rename(_L + r"ln_1\." + _P, "blocks.{i}.norm1.{p}"),
        Rename(_L + r"self_attention\.in_proj_(?P<p>weight|bias)", "blocks.{i}.attn.qkv.{p}", note="q/k/v fused"),
        Rename(_L + r"self_attention\.out_proj\." + _P, "blocks.{i}.attn.proj.{p}"),
        Rename(_L + r"ln_2\." + _P, "blocks.{i}.norm2.{p}"),
        Rename(_L + r"mlp\.(?:0|linear_1)\." + _P, "blocks.{i}.mlp.fc1.{p}"),
        Rename(_L + r"mlp\.(?:3|linear_2)\." + _P, "blocks.{i}.mlp.fc2.{p}"),
        Rename(r"encoder\.ln\." + _P, "norm.{p}"),
        Rename(r"heads\.head\." + _P, "head.{p}"),
        Drop(r"heads\.pre_logits\." + _P, "representation layer (Linear + Tanh) timm's ViT does not have"),
    ),
    compat="torchvision",
    finish=_vit_finish,
)


def _stage(m: re.Match) -> int:
    return (int(m["n"]) - 1) // 2


def _swin_rules(v2: bool) -> tuple:
    blk = r"features\.(?P<n>\d*[13579])\.(?P<i>\d+)\."

    def block(rest: str):
        return lambda m: f"layers.{_stage(m)}.blocks.{m['i']}.{rest.format(**m.groupdict())}"

    rules: list = [
        Rename(r"features\.0\.0\." + _P, "patch_embed.proj.{p}"),
        Rename(r"features\.0\.2\." + _P, "patch_embed.norm.{p}"),
        Rename(blk + r"(?P<m>norm1|norm2|attn\.proj)\." + _P, block("{m}.{p}")),
        Rename(blk + r"attn\.qkv\.weight", block("attn.qkv.weight")),
        Rename(blk + r"mlp\.0\." + _P, block("mlp.fc1.{p}")),
        Rename(blk + r"mlp\.3\." + _P, block("mlp.fc2.{p}")),
        Drop(blk + r"attn\.relative_position_index", "derived buffer: timm recomputes it from the window"),
        Rename(
            r"features\.(?P<n>\d*[02468])\.(?P<m>reduction|norm)\.(?P<p>weight|bias)",
            lambda m: f"layers.{int(m['n']) // 2}.downsample.{m['m']}.{m['p']}",
        ),
        Rename(r"norm\." + _P, "norm.{p}"),
        Rename(r"head\." + _P, "head.fc.{p}"),
    ]
    if v2:
        rules += [
            Rename(blk + r"attn\.(?P<m>logit_scale|cpb_mlp\.\d\.(?:weight|bias))", block("attn.{m}")),
            Split(
                blk + r"attn\.qkv\.bias",
                (
                    (block("attn.q_bias"), 3, 0, 1, "query bias"),
                    (None, 3, 1, 2, "key bias: torchvision zeroes it at every forward, timm has none"),
                    (block("attn.v_bias"), 3, 2, 3, "value bias"),
                ),
            ),
            Drop(blk + r"attn\.relative_coords_table", "derived buffer: timm recomputes it from the window"),
        ]
    else:
        rules += [
            Rename(blk + r"attn\.qkv\.bias", block("attn.qkv.bias")),
            Rename(blk + r"attn\.relative_position_bias_table", block("attn.relative_position_bias_table")),
        ]
    return tuple(rules)


SWIN = Layout(
    name="torchvision.swin",
    origin="torchvision",
    families=("swin",),
    signature=(r"features\.0\.0\.weight", r"features\.1\.0\.attn\.relative_position_bias_table"),
    rules=_swin_rules(v2=False),
    compat="torchvision",
)

SWIN_V2 = Layout(
    name="torchvision.swin_v2",
    origin="torchvision",
    families=("swinv2",),
    signature=(r"features\.0\.0\.weight", r"features\.1\.0\.attn\.logit_scale"),
    rules=_swin_rules(v2=True),
    compat="torchvision",
)

LAYOUTS = (VIT, SWIN, SWIN_V2)
