"""MLP-Mixer, ResMLP and gMLP: token-mixing weights sized by the token count, so the image and patch size cannot
change (declared at validation); the channels and the head can."""

from timm.models import mlp_mixer

from timm_anysize.core.family import Family, TinyModel, gray_and_4ch

__all__ = ["FAMILIES"]

_TOKEN_MIXING = (
    "its token-mixing weights (MLP-Mixer/ResMLP mlp_tokens, gMLP's spatial gate) are sized by the token count "
    "(img_size / patch_size squared); there is no principled resample of a learned token-by-token matrix"
)

FAMILIES = (
    Family(
        name="mlp_mixer",
        classes=(mlp_mixer.MlpMixer,),  # MLP-Mixer, ResMLP, gMLP
        tensors=(),
        patch_embeds=("stem",),
        dynamic="",
        dynamic_args=(),
        dynamic_reason=f"{_TOKEN_MIXING.split(';')[0]}: one input size only",
        unsupported={
            change: _TOKEN_MIXING for change in ("img_larger", "img_non_square", "patch_smaller", "patch_larger")
        },
        example="gmlp_ti16_224",
        tiny=TinyModel(
            conformance=gray_and_4ch(64, 64, pretrained={"img_size": 64}),  # gMLP-Ti: 16 tokens
            base="anysize_tiny_gmlp",  # gMLP-Ti's 30 blocks took 20 s a variant in timm's prune test
            script_fx="",
            script_fx_note="it runs at its own size only, through timm's own forward: timm's tests check it on the "
            "conformance variants",
        ),
    ),
)
