"""Converting a checkpoint to a variant's timm safetensors file, one tensor at a time.

``timm-anysize convert`` and :func:`convert_checkpoint` read each tensor when its target key comes, adapt it and
append it to the output, so the peak is a few of the largest tensors, not the checkpoint: a file larger than the
machine's memory converts. The output is written under a temporary name and renamed at the end; on any error
(a key that does not fit, a non-finite tensor) nothing is written and an existing output is kept.

A safetensors file in timm's layout streams from disk (:class:`~timm_anysize.core.safetensors_io.LazySafetensors`);
another library's layout, and ``.pth``/``.bin`` files, are read memory-mapped first (their layout conversion needs
every key), then written the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Mapping, Union

import torch

from timm_anysize.adapt import iter_adapted
from timm_anysize.core.errors import WeightsError
from timm_anysize.core.meta import build_meta
from timm_anysize.core.report import AdaptationReport
from timm_anysize.core.safetensors_io import LazySafetensors, write_safetensors
from timm_anysize.core.spec import VariantSpec
from timm_anysize.plan import VariantPlan, make_plan, source_read
from timm_anysize.source_weights import load_source_state_dict, refuse_non_finite
from timm_anysize.weight_files import detect_format

__all__ = ["convert_checkpoint"]


def convert_checkpoint(spec: VariantSpec, out: Union[str, os.PathLike]) -> AdaptationReport:
    """Adapt the variant's ``pretrained.file`` to its geometry and write it to ``out`` as safetensors, streaming.

    Tensors keep the checkpoint's dtype (resampling runs in float32 and is cast back); the file loads into plain
    timm's model at the variant's geometry (``pretrained_cfg_overlay=dict(file=out)``).

    Args:
        spec: A variant whose ``pretrained.file`` is the checkpoint.
        out: The safetensors file to write.

    Returns:
        The adaptation report: how each tensor was obtained.

    Raises:
        WeightsError: The checkpoint cannot be read, has a non-finite tensor, or would need a fresh init (a new
            head: convert writes weights, it does not make them up).
        AdaptationError: The keys do not fit the variant; nothing is written.

    Example:
        >>> import tempfile, timm, torch
        >>> from safetensors.torch import save_file
        >>> from timm_anysize.core.spec import parse_variant
        >>> d = tempfile.mkdtemp()
        >>> save_file(timm.create_model("test_vit").state_dict(), d + "/w.safetensors")
        >>> spec = parse_variant("v", {"base": "test_vit", "img_size": 64, "patch_size": 8,
        ...                            "pretrained": {"file": d + "/w.safetensors"}})
        >>> report = convert_checkpoint(spec, d + "/out.safetensors")
        >>> report.by_action("resampled")
        ['pos_embed', 'patch_embed.proj.weight']
    """
    file = spec.pretrained.file
    if file is None:
        raise WeightsError(f"{spec.where}.pretrained.file: convert reads a local file; this variant names none")
    plan = make_plan(spec, weights={"file": str(file)})
    source, desc = _source(plan, Path(file))
    target_sd = build_meta(spec, plan.target_kwargs, "target", plan.family).state_dict()
    report = AdaptationReport(spec.name, desc, plan.source.describe(), plan.target.describe())

    def dtype_of(key: str) -> torch.dtype:
        if key not in source:
            return target_sd[key].dtype
        dtype = source.dtype(key) if isinstance(source, LazySafetensors) else source[key].dtype
        return dtype if dtype.is_floating_point else target_sd[key].dtype

    entries = [(k, dtype_of(k), tuple(v.shape)) for k, v in target_sd.items()]
    dtypes = {k: d for k, d, _ in entries}
    write_safetensors(out, entries, _checked(iter_adapted(source, target_sd, plan, report), dtypes, desc))
    return report


def _source(plan: VariantPlan, file: Path) -> tuple[Mapping[str, torch.Tensor], str]:
    """The checkpoint as a mapping: lazy for a safetensors file already in timm's layout at the source geometry."""
    desc = f"file {file}"
    if file.is_file() and detect_format(file) == "safetensors" and plan.spec.pretrained.layout in ("auto", "timm"):
        lazy = LazySafetensors(file)
        if lazy.keys() <= plan.source_shapes.keys() and all(lazy.shape(k) == plan.source_shapes[k] for k in lazy):
            return lazy, desc
    state_dict, desc = load_source_state_dict(source_read(plan), {"file": str(file)})
    return state_dict, desc


def _checked(
    items: Iterator[tuple[str, torch.Tensor]], dtypes: Mapping[str, torch.dtype], desc: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each adapted tensor in its output dtype, refused when it is non-finite or has no value (a fresh init)."""
    for key, value in items:
        if value.is_meta:
            raise WeightsError(
                f"{desc}: {key} would be freshly initialised (a new head or adapt.init_keys); convert writes "
                f"the checkpoint's weights only: keep num_classes, or create the model and save it instead"
            )
        refuse_non_finite({key: value}, desc)
        yield key, value.to(dtypes[key])
