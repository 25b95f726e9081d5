"""Twins (PCPVT, SVT): position by convolution (PosConv), nothing laid out on a grid; timm's own path runs at any
size."""

from timm.models import twins

from timm_anysize.core.family import Family, TinyModel, gray_and_4ch

__all__ = ["FAMILIES"]


FAMILIES = (
    Family(
        name="twins",
        dynamic_features=True,
        classes=(twins.Twins,),
        tensors=(),  # position by convolution (PosConv): nothing on a grid
        patch_embeds=("patch_embeds.0",),
        dynamic="native",
        dynamic_args=(),
        export_note="torch.export takes symbolic sizes to be at least 2, so the program refuses inputs where a stage "
        "has a single row or column of attention windows; ONNX also stops on timm's own 5-D "
        "scaled_dot_product_attention (as NesT's); torch.compile(dynamic=True) equals eager (tested)",
        example="twins_svt_small",
        tiny=TinyModel(
            dict(embed_dims=(32, 64, 128, 256), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)),
            step=32,
            feature_indices=(0, 1, 2),
            script_fx="windows",
            fx_features_note="timm names its feature modules 'block.k' (the modules are 'blocks.k'): plain timm's fx "
            "and hook feature extractors fail on them too",
            # one symbolic graph takes about a minute of a core to capture, and the local attention's window count
            # (7x7 windows, padded) is a guard: at the module's sizes it recompiled at each (3 minutes); three sizes
            # of one window count instead (the own size, a larger one, one that is not whole patches)
            compile_sizes=((96, 64), (112, 80), (90, 70)),
            conformance=gray_and_4ch((64, 96), 160),
            min_input=32,
        ),
    ),
)
