"""Test infrastructure: small timm entrypoints of the families whose ``example``'s entrypoint fixes full widths and
depths (timm's ``volo_d1_224``, ``nest_tiny``, ``mvitv2_tiny`` and ``gmlp_ti16_224`` take no size arguments: a
``depths=...`` collides with their own), registered through timm's public registry with the examples' own classes and
pretrained cfgs. A row names one in ``TinyModel.base``; the tests that build a row's tiny model
(``conftest.tiny_arch``) build it instead of the full-size example, and so do its conformance variants (timm's own
tests, run in a subprocess that imports this file first). Not product code."""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models.mlp_mixer import GatedMlp, MlpMixer, SpatialGatingBlock
from timm.models.mlp_mixer import checkpoint_filter_fn as mixer_filter
from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg
from timm.models.mvitv2 import checkpoint_filter_fn as mvitv2_filter
from timm.models.nest import Nest
from timm.models.nest import checkpoint_filter_fn as nest_filter
from timm.models.volo import VOLO

# Each builds with the feature and checkpoint-filter arguments of timm's own entrypoint for the class (features_only
# gives the same kind of feature wrapper).


def _cfg_of(name: str) -> dict:
    """``name``'s pretrained cfg (input, first conv, classifier, ...) with no weights to download."""
    cfg = get_pretrained_cfg(name).to_dict()
    for key in ("url", "hf_hub_id", "file", "state_dict", "tag", "architecture", "source"):
        cfg.pop(key, None)
    return cfg


default_cfgs = generate_default_cfgs(
    {
        "anysize_tiny_volo.untrained": _cfg_of("volo_d1_224"),
        "anysize_tiny_nest.untrained": _cfg_of("nest_tiny"),
        "anysize_tiny_mvitv2.untrained": _cfg_of("mvitv2_tiny"),
        "anysize_tiny_gmlp.untrained": _cfg_of("gmlp_ti16_224"),
    }
)


@register_model
def anysize_tiny_volo(pretrained: bool = False, **kwargs) -> VOLO:
    """VOLO-D1's layout (an outlooker stage, then transformer stages, class-attention post layers) at width 32-64."""
    args = dict(layers=(1, 1, 1, 1), embed_dims=(32, 64, 64, 64), num_heads=(1, 2, 2, 2), stem_hidden_dim=16)
    feature_cfg = dict(out_indices=kwargs.pop("out_indices", 3), feature_cls="getter")
    return build_model_with_cfg(VOLO, "anysize_tiny_volo", pretrained, feature_cfg=feature_cfg, **dict(args, **kwargs))


@register_model
def anysize_tiny_nest(pretrained: bool = False, **kwargs) -> Nest:
    """NesT-T's layout (4x4 blocks of 4x4 patches, three levels) at width 16-64, one block a level."""
    args = dict(embed_dims=(16, 32, 64), num_heads=(1, 2, 2), depths=(1, 1, 1))
    return build_model_with_cfg(
        Nest,
        "anysize_tiny_nest",
        pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2), flatten_sequential=True),
        pretrained_filter_fn=nest_filter,
        **dict(args, **kwargs),
    )


@register_model
def anysize_tiny_mvitv2(pretrained: bool = False, **kwargs) -> MultiScaleVit:
    """MViTv2-T's layout (four pooled stages with per-axis relative-position tables) at width 16-128, one block each."""
    cfg = MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=16)
    feature_cfg = dict(out_indices=kwargs.pop("out_indices", 4), feature_cls="getter")
    return build_model_with_cfg(
        MultiScaleVit,
        "anysize_tiny_mvitv2",
        pretrained,
        model_cfg=cfg,
        pretrained_filter_fn=mvitv2_filter,
        feature_cfg=feature_cfg,
        **kwargs,
    )


@register_model
def anysize_tiny_gmlp(pretrained: bool = False, **kwargs) -> MlpMixer:
    """gMLP-Ti's layout (16 px patches, spatial gating blocks) at width 32, four blocks (it has 30; timm's feature
    wrapper takes block 3 by default)."""
    args = dict(
        patch_size=16, num_blocks=4, embed_dim=32, mlp_ratio=6, block_layer=SpatialGatingBlock, mlp_layer=GatedMlp
    )
    feature_cfg = dict(out_indices=kwargs.pop("out_indices", 3), feature_cls="getter")
    return build_model_with_cfg(
        MlpMixer,
        "anysize_tiny_gmlp",
        pretrained,
        pretrained_filter_fn=mixer_filter,
        feature_cfg=feature_cfg,
        **dict(args, **kwargs),
    )
