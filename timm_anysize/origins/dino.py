"""DINO and DINOv2 training checkpoints: the backbone of the teacher (default) or the student.

DINO's ``{'teacher': ..., 'student': ..., 'optimizer': ..., 'args': ...}`` (student under DDP's ``module.``) and
DINOv2's ``teacher.`` / ``student.`` prefixes are unwrapped by :func:`timm_anysize.origins.unwrap_checkpoint`
(``pretrained.select``). The backbone already uses timm's names; what remains is the ``backbone.`` prefix, DINOv2's
block chunks (``blocks.<chunk>.<i>``), its register tokens, and the projection heads, which are dropped.
DINO and DINOv2 resample the position embedding with ``scale_factor=(n + 0.1) / M``: ``compat: dino``.
"""

from __future__ import annotations

from timm_anysize.origins.mapping import Conversion, Drop, Layout, Rename, fold_class_position

__all__ = ["LAYOUTS"]


def _finish(conv: Conversion, config: dict) -> None:
    if "reg_token" in conv.state_dict:
        fold_class_position(conv)


DINO = Layout(
    name="dino.vit",
    origin="dino",
    families=("vit",),
    signature=(r"backbone\.cls_token", r"backbone\.blocks\.(?:\d+\.)?0\.norm1\.weight"),
    rules=(
        Rename(r"backbone\.(?P<k>cls_token|pos_embed|patch_embed\.proj\.(?:weight|bias)|norm\.(?:weight|bias))", "{k}"),
        Rename(r"backbone\.register_tokens", "reg_token"),
        Drop(r"backbone\.mask_token", "mask token of iBOT/DINOv2 masked training"),
        Rename(
            r"backbone\.blocks\.(?:\d+\.)?(?P<i>\d+)\.mlp\.w12\.(?P<p>weight|bias)",
            "blocks.{i}.mlp.fc1.{p}",
            note="SwiGLU w12",
        ),
        Rename(
            r"backbone\.blocks\.(?:\d+\.)?(?P<i>\d+)\.mlp\.w3\.(?P<p>weight|bias)",
            "blocks.{i}.mlp.fc2.{p}",
            note="SwiGLU w3",
        ),
        Rename(r"backbone\.blocks\.(?:\d+\.)?(?P<i>\d+)\.(?P<rest>.+)", "blocks.{i}.{rest}"),
        Drop(r"(?:head|dino_head|ibot_head)\..+", "DINO projection head (self-supervised training only)"),
    ),
    compat="dino",
    finish=_finish,
)

LAYOUTS = (DINO,)
