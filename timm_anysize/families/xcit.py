"""XCiT: Fourier position encoding computed for the grid at run time; timm's own path runs at any size."""

from timm.models import xcit

from timm_anysize.core.family import NO_CONV_PATCH, Family, TinyModel, gray_and_4ch, no_patch_change

__all__ = ["FAMILIES"]


FAMILIES = (
    Family(
        name="xcit",
        dynamic_features=True,
        classes=(xcit.Xcit,),
        tensors=(),  # Fourier position encoding, computed for the grid at run time
        unsupported=no_patch_change(NO_CONV_PATCH),
        dynamic="native",
        dynamic_args=(),
        example="xcit_nano_12_p16_224",
        tiny=TinyModel(
            dict(depth=2), script_fx="windows", conformance=gray_and_4ch((64, 96), 144, model_args=dict(depth=3))
        ),
    ),
)
