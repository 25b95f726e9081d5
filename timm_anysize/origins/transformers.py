"""Hugging Face transformers checkpoints: ViT, DeiT, DINOv2 (with registers), BEiT and Swin.

Both the names ``save_pretrained`` writes (``encoder.layer.N.attention.attention.query``) and transformers 5's
in-memory names (``layers.N.attention.q_proj``) are read; q/k/v projections are fused into timm's ``qkv``. A
``config.json`` beside the weights supplies the LayerNorm eps and activation, checked against the timm model.
"""

from __future__ import annotations

import re

from timm_anysize.origins.mapping import Conversion, Drop, Fuse, Layout, Rename, fold_class_position

__all__ = ["LAYOUTS"]

_P = r"(?P<p>weight|bias)"


def _layer(prefix: str) -> str:
    return rf"(?:{prefix})?(?:encoder\.layer|layers)\.(?P<i>\d+)\."


def _qkv(layer: str, target: str, params: str = _P, self_name: str = "attention") -> Fuse:
    parts = tuple(rf"{layer}attention\.(?:{self_name}\.{n}|{n[0]}_proj)\.{params}" for n in ("query", "key", "value"))
    return Fuse(parts, target, note="q/k/v fused")


def _config_numerics(default_eps: float):
    def finish(conv: Conversion, config: dict) -> None:
        conv.numerics["layer_norm_eps"] = float(config.get("layer_norm_eps", default_eps))
        conv.numerics["hidden_act"] = str(config.get("hidden_act", "gelu"))

    return finish


def _vit_rules(prefix: str, extra: tuple = ()) -> tuple:
    L = _layer(prefix)
    return (
        Rename(rf"(?:{prefix})?embeddings\.cls_token", "cls_token"),
        Rename(rf"(?:{prefix})?embeddings\.position_embeddings", "pos_embed"),
        Rename(rf"(?:{prefix})?embeddings\.patch_embeddings\.projection\." + _P, "patch_embed.proj.{p}"),
        Drop(rf"(?:{prefix})?embeddings\.mask_token", "mask token of masked-image-modelling pre-training"),
        _qkv(L, "blocks.{i}.attn.qkv.{p}"),
        Rename(rf"{L}attention\.(?:output\.dense|o_proj)\." + _P, "blocks.{i}.attn.proj.{p}"),
        Rename(rf"{L}(?:layernorm_before|norm1)\." + _P, "blocks.{i}.norm1.{p}"),
        Rename(rf"{L}(?:layernorm_after|norm2)\." + _P, "blocks.{i}.norm2.{p}"),
        Rename(rf"{L}(?:intermediate\.dense|mlp\.fc1)\." + _P, "blocks.{i}.mlp.fc1.{p}"),
        Rename(rf"{L}(?:output\.dense|mlp\.fc2)\." + _P, "blocks.{i}.mlp.fc2.{p}"),
        Rename(rf"(?:{prefix})?layernorm\." + _P, "norm.{p}"),
        Drop(rf"(?:{prefix})?pooler\.dense\." + _P, "ViTModel's pooler (Linear + Tanh), unused by its classifier"),
        *extra,
    )


VIT = Layout(
    name="transformers.vit",
    origin="transformers",
    families=("vit",),
    signature=(
        r"(?:vit\.)?embeddings\.patch_embeddings\.projection\.weight",
        r"(?:vit\.)?(?:encoder\.layer|layers)\.0\.layernorm_before\.weight",
    ),
    rules=_vit_rules(r"vit\.", (Rename(r"classifier\." + _P, "head.{p}"),)),
    compat="transformers",
    finish=_config_numerics(1e-12),
)


def _deit_finish(conv: Conversion, config: dict) -> None:
    _config_numerics(1e-12)(conv, config)
    if "head.weight" in conv.state_dict and "head_dist.weight" not in conv.state_dict:
        conv.head_unusable = (
            "DeiTForImageClassification's classifier reads the class token only, timm's distilled "
            "DeiT averages a class and a distillation head"
        )


DEIT = Layout(
    name="transformers.deit",
    origin="transformers",
    families=("vit", "deit_distilled"),
    signature=(r"(?:deit\.)?embeddings\.distillation_token",),
    rules=(
        Rename(r"(?:deit\.)?embeddings\.distillation_token", "dist_token"),
        Rename(r"(?:cls_)?classifier\." + _P, "head.{p}"),
        Rename(r"distillation_classifier\." + _P, "head_dist.{p}"),
        *_vit_rules(r"deit\."),
    ),
    compat="transformers",
    finish=_deit_finish,
)


def _dinov2_finish(conv: Conversion, config: dict) -> None:
    _config_numerics(1e-6)(conv, config)
    if "reg_token" in conv.state_dict:
        fold_class_position(conv)
    if "head.weight" in conv.state_dict:
        conv.head_unusable = (
            "Dinov2ForImageClassification's classifier reads the class token concatenated with "
            "the mean patch token, which timm's ViT head does not"
        )


def _dinov2_rules() -> tuple:
    L = _layer(r"dinov2\.")
    return (
        Rename(r"(?:dinov2\.)?embeddings\.register_tokens", "reg_token"),
        Rename(rf"{L}(?:layer_scale1)\.lambda1", "blocks.{i}.ls1.gamma"),
        Rename(rf"{L}(?:layer_scale2)\.lambda1", "blocks.{i}.ls2.gamma"),
        Rename(r"classifier\." + _P, "head.{p}"),
        *_vit_rules(r"dinov2\."),
    )


DINOV2 = Layout(
    name="transformers.dinov2",
    origin="transformers",
    families=("vit",),
    signature=(r"(?:dinov2\.)?(?:encoder\.layer|layers)\.0\.layer_scale1\.lambda1",),
    rules=_dinov2_rules(),
    compat="transformers",  # Dinov2WithRegisters antialiases: that one is compat timm
    finish=_dinov2_finish,
)


def _beit_rules() -> tuple:
    L = _layer(r"beit\.")
    return (
        Fuse(
            (
                rf"{L}attention\.(?:attention\.query|q_proj)\.weight",
                rf"{L}attention\.(?:attention\.key|k_proj)\.weight",
                rf"{L}attention\.(?:attention\.value|v_proj)\.weight",
            ),
            "blocks.{i}.attn.qkv.weight",
            note="q/k/v fused",
        ),
        Rename(rf"{L}attention\.(?:attention\.query|q_proj)\.bias", "blocks.{i}.attn.q_bias"),
        Rename(rf"{L}attention\.(?:attention\.value|v_proj)\.bias", "blocks.{i}.attn.v_bias"),
        Rename(
            rf"{L}(?:attention\.attention\.)?relative_position_bias\.relative_position_bias_table",
            "blocks.{i}.attn.relative_position_bias_table",
        ),
        Drop(
            rf"{L}(?:attention\.attention\.)?relative_position_bias\.relative_position_index",
            "derived buffer: timm recomputes it from the window",
        ),
        Rename(
            r"(?:beit\.)?encoder\.relative_position_bias\.relative_position_bias_table",
            "rel_pos_bias.relative_position_bias_table",
        ),
        Rename(rf"{L}lambda_(?P<n>[12])", lambda m: f"blocks.{m['i']}.gamma_{m['n']}"),
        Rename(r"(?:beit\.)?pooler\.layernorm\." + _P, "fc_norm.{p}"),
        Rename(r"classifier\." + _P, "head.{p}"),
        *_vit_rules(r"beit\."),
    )


BEIT = Layout(
    name="transformers.beit",
    origin="transformers",
    families=("beit",),
    signature=(r"(?:beit\.)?(?:encoder\.layer|layers)\.0\.lambda_1",),
    rules=_beit_rules(),
    compat="transformers",
    finish=_config_numerics(1e-12),
)


def _swin_block(m: re.Match, rest: str) -> str:
    return f"layers.{m['s']}.blocks.{m['i']}.{rest}"


def _swin_rules() -> tuple:
    B = r"(?:swin\.)?encoder\.layers\.(?P<s>\d+)\.blocks\.(?P<i>\d+)\."
    qkv = _qkv(B, "", self_name="self")
    return (
        Rename(r"(?:swin\.)?embeddings\.patch_embeddings\.projection\." + _P, "patch_embed.proj.{p}"),
        Rename(r"(?:swin\.)?embeddings\.norm\." + _P, "patch_embed.norm.{p}"),
        Drop(r"(?:swin\.)?embeddings\.mask_token", "mask token of masked-image-modelling pre-training"),
        Fuse(qkv.parts, lambda m: _swin_block(m, f"attn.qkv.{m['p']}"), note="q/k/v fused"),
        Rename(
            B + r"attention\.(?:self\.)?relative_position_bias_table",
            lambda m: _swin_block(m, "attn.relative_position_bias_table"),
        ),
        Drop(B + r"attention\.(?:self\.)?relative_position_index", "derived buffer: timm recomputes it"),
        Rename(B + r"attention\.(?:output\.dense|o_proj)\." + _P, lambda m: _swin_block(m, f"attn.proj.{m['p']}")),
        Rename(B + r"layernorm_before\." + _P, lambda m: _swin_block(m, f"norm1.{m['p']}")),
        Rename(B + r"layernorm_after\." + _P, lambda m: _swin_block(m, f"norm2.{m['p']}")),
        Rename(B + r"(?:intermediate\.dense|mlp\.fc1)\." + _P, lambda m: _swin_block(m, f"mlp.fc1.{m['p']}")),
        Rename(B + r"(?:output\.dense|mlp\.fc2)\." + _P, lambda m: _swin_block(m, f"mlp.fc2.{m['p']}")),
        # transformers merges at the end of a stage, timm at the start of the next
        Rename(
            r"(?:swin\.)?encoder\.layers\.(?P<s>\d+)\.downsample\.(?P<m>reduction|norm)\." + _P,
            lambda m: f"layers.{int(m['s']) + 1}.downsample.{m['m']}.{m['p']}",
        ),
        Rename(r"(?:swin\.)?layernorm\." + _P, "norm.{p}"),
        Rename(r"classifier\." + _P, "head.fc.{p}"),
    )


SWIN = Layout(
    name="transformers.swin",
    origin="transformers",
    families=("swin",),
    signature=(r"(?:swin\.)?encoder\.layers\.0\.blocks\.0\.layernorm_before\.weight",),
    rules=_swin_rules(),
    compat="transformers",
    finish=_config_numerics(1e-5),
)

LAYOUTS = (VIT, DEIT, DINOV2, BEIT, SWIN)
