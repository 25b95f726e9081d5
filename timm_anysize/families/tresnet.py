"""TResNet: a CNN that sees the image through a 4x4 space-to-depth, so its first convolution takes ``16 * C``
channels; the channels are adapted per block offset. No tensor depends on the image size (any size, as timm).

timm's space-to-depth takes whole 4x4 blocks only. With ``pad: true`` (the default) a run-time input that is not a
multiple of 4 is zero-padded bottom/right to one, as the patch families pad to whole patches (the space-to-depth is a
4x4 patchify: padding is the same choice, and timm's ``dynamic_img_pad`` makes it for them); with ``pad: false`` it
raises :class:`~timm_anysize.InputNotDivisibleError` naming the nearest multiples. An input below the smallest its
strides take (20 px for ``tresnet_m``) raises :class:`~timm_anysize.InputSizeError` either way."""

from timm.models import tresnet

from timm_anysize.core.family import Family, TinyModel, gray_and_4ch, no_patch_change

__all__ = ["FAMILIES"]


FAMILIES = (
    Family(
        name="tresnet",
        dynamic_features=True,
        classes=(tresnet.TResNet,),
        tensors=(),
        patch_embeds=(),
        space_to_depth=4,  # timm's SpaceToDepth(4): input channel (i * 4 + j) * C + c of body.conv1
        dynamic="native",
        whole_patches=True,  # timm's forward neither pads nor crops: whole 4x4 blocks
        stem_pad=True,  # pad: true pads to whole blocks, as the patch families pad to whole patches
        dynamic_args=(),
        unsupported=no_patch_change(
            "TResNet's stem is a fixed 4x4 space-to-depth followed by a 3x3 convolution; "
            "there is no patch kernel to resize"
        ),
        example="tresnet_m",
        tiny=TinyModel(
            dict(layers=[1, 1, 1, 1], width_factor=0.25),
            step=32,
            img_size_arg=False,
            conformance=gray_and_4ch((96, 160), 128),
            min_input=20,
            multiple=4,
            script_fx="",
            script_fx_note="its forward is timm's own (a CNN): timm's tests check it on the conformance variants",
        ),
    ),
)
