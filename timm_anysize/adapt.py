"""Mapping a source state dict onto a target model of another geometry, one tensor at a time, with a report.

Every target key is produced by exactly one rule (copy, resample, adapt, or a declared fresh init) and every source
key is either used or declared unused; anything else is an :class:`AdaptationError` that lists the keys.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Iterable, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from timm.layers import resample_patch_embed, resize_rel_pos_bias_table
from timm.models import adapt_input_conv

from timm_anysize.core.compat import compat_rel_table, compat_resize_rel_table
from timm_anysize.core.errors import AdaptationError
from timm_anysize.core.geometry import TensorResample
from timm_anysize.core.report import Action, AdaptationReport, KeyAdaptation, summarize_keys
from timm_anysize.core.resample import (
    resample_blocks,
    resample_grid,
    resample_pos_tokens,
    resize_bias_grid,
    resize_rel_axis,
)
from timm_anysize.core.spec import ChannelOptions, PatchEmbedOptions, PosEmbedOptions, Size2, as_pair
from timm_anysize.core.variant_plan import VariantPlan
from timm_anysize.origins import Conversion, layout_hint
from timm_anysize.source_weights import SourceStateDict

__all__ = [
    "adapt_state_dict",
    "resample_pos_embed",
    "resample_tensor",
    "resize_patch_kernel",
    "adapt_kernel_channels",
]

_logger = logging.getLogger(__name__)
StateDict = dict[str, torch.Tensor]


def resample_pos_embed(
    pos_embed: torch.Tensor, old_grid: Size2, new_grid: Size2, num_prefix_tokens: int, options: PosEmbedOptions
) -> torch.Tensor:
    """Resample an absolute position embedding ``[1, prefix + H*W, C]`` between any two grids, with the options of
    a spec: :func:`timm_anysize.core.resample.resample_pos_tokens`, the function the dynamic paths call at run time,
    so a load at a size and a dynamic model run at it resample identically.

    Prefix tokens (class, distillation, registers) are kept aside; the grid is interpolated in float32.

    Example:
        >>> pe = torch.randn(1, 1 + 4 * 6, 8)
        >>> resample_pos_embed(pe, (4, 6), (8, 3), 1, PosEmbedOptions()).shape
        torch.Size([1, 25, 8])
    """
    return resample_pos_tokens(
        pos_embed,
        list(new_grid),
        list(old_grid),
        num_prefix_tokens,
        options.interpolation,
        options.use_antialias,
        options.compat,
    )


def resize_patch_kernel(weight: torch.Tensor, new_size: Size2, options: PatchEmbedOptions) -> torch.Tensor:
    """Resize a patch-embedding kernel ``[O, I, kh, kw]`` to ``new_size``.

    With ``method='pi'`` (default) this is FlexiViT's pseudo-inverse resize (`timm.layers.resample_patch_embed`):
    a patch resized by the same interpolation gives the same token. ``'interpolate'`` resizes the kernel like an
    image, which changes the token scale; it exists to show why PI-resize matters.

    Example:
        >>> resize_patch_kernel(torch.randn(8, 3, 16, 16), (4, 4), PatchEmbedOptions()).shape
        torch.Size([8, 3, 4, 4])
    """
    if options.method == "pi":
        return resample_patch_embed(
            weight, list(new_size), interpolation=options.interpolation, antialias=options.antialias
        )
    out = F.interpolate(
        weight.float(),
        size=tuple(new_size),
        mode=options.interpolation,
        antialias=options.antialias,
        align_corners=False,
    )
    return out.to(weight.dtype)


def adapt_kernel_channels(weight: torch.Tensor, in_chans: int, options: ChannelOptions) -> torch.Tensor:
    """Adapt the input-channel dimension of a kernel ``[O, I, kh, kw]`` to ``in_chans``.

    ``'timm'`` follows `timm.models.adapt_input_conv` (1 channel: sum over RGB, so a gray image gives the same
    tokens as the RGB model on that image repeated; more channels: repeat and scale by ``I / in_chans``).
    ``'map'`` takes target channel ``i`` from source channel ``map[i]`` (``None``: zeros).

    Example:
        >>> adapt_kernel_channels(torch.randn(8, 3, 4, 4), 1, ChannelOptions()).shape
        torch.Size([8, 1, 4, 4])
    """
    if options.method == "map":
        cols = [weight[:, c] if c is not None else torch.zeros_like(weight[:, 0]) for c in options.map or ()]
        return torch.stack(cols, dim=1)
    return adapt_input_conv(in_chans, weight, base_chans=weight.shape[1])


def _matches(key: str, patterns: tuple[str, ...]) -> Optional[str]:
    return next((p for p in patterns if fnmatch.fnmatchcase(key, p)), None)


def _fmt(size: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in size)


def resample_tensor(
    src: torch.Tensor, layout: TensorResample, target_shape: tuple[int, ...], options: PosEmbedOptions
) -> tuple[torch.Tensor, str]:
    """Resample one geometry-dependent tensor between its source and target layout; returns it and a description."""
    a, b = _fmt(layout.source), _fmt(layout.target)
    if layout.kind == "pos_tokens":
        value = resample_pos_embed(src, as_pair(layout.source), as_pair(layout.target), layout.prefix, options)
        how = f"{options.interpolation}, antialias={options.use_antialias}, {layout.prefix} prefix tokens kept"
        if options.compat != "timm":
            how = f"compat {options.compat}, {layout.prefix} prefix tokens kept"
        return value, f"grid {a} -> {b} ({how})"
    if layout.kind in ("pos_nchw", "pos_nhwc"):
        value = resample_grid(
            src,
            list(layout.target),
            options.interpolation,
            options.use_antialias,
            channels_last=layout.kind == "pos_nhwc",
        )
        return value, f"grid {a} -> {b} ({options.interpolation}, antialias={options.use_antialias})"
    if layout.kind == "rel_table":
        if compat_rel_table(options.compat) == "bilinear":  # the origin library's own resize (transformers' BEiT)
            value = compat_resize_rel_table(src, list(layout.source), list(layout.target))
            return value, f"relative-position window {a} -> {b} (compat {options.compat}: bilinear)"
        # Both windows are read off the models, so nothing is inferred from the table's size.
        value = resize_rel_pos_bias_table(
            src,
            new_window_size=as_pair(layout.target),
            new_bias_shape=target_shape,
            old_window_size=as_pair(layout.source),
        )
        return value, f"relative-position window {a} -> {b}"
    if layout.kind == "pos_blocks":
        value = resample_blocks(src, list(layout.target), options.interpolation, options.use_antialias)
        return value, f"blocked grid {a} -> {b} ({options.interpolation}, antialias={options.use_antialias})"
    if layout.kind == "rel_axis":
        return resize_rel_axis(src, layout.target[0]), f"relative-position axis {a} -> {b} entries (linear)"
    value = resize_bias_grid(src, layout.source, layout.target, options.interpolation)  # type: ignore[arg-type]
    return value, f"attention-bias grid {a} -> {b} ({options.interpolation})"


def _source_mismatch(key: str, src: torch.Tensor, expected: tuple, layout: TensorResample, geometry: str) -> str:
    if layout.kind == "pos_tokens" and src.ndim == 3 and len(expected) == 3:
        return (
            f"{key}: checkpoint has {src.shape[1]} tokens, the source geometry ({geometry}) implies {expected[1]}; "
            f"declare the geometry the weights were trained at under pretrained: (img_size, patch_size)"
        )
    return (
        f"{key}: checkpoint {tuple(src.shape)}, the source geometry ({geometry}) implies {expected}; declare what the "
        f"weights were built with under pretrained: (img_size, patch_size, or model_args such as a Swin window_size)"
    )


def _adapt_kernel(src: torch.Tensor, tgt: torch.Tensor, plan: VariantPlan) -> tuple[torch.Tensor, str]:
    """The first kernel: input channels adapted, and (patch kernels) resized to the target patch.

    A linear patch projection over flattened patches (NaFlexViT ``(ph, pw, C)``, Gemma 4 ``(C, ph, pw)``) is viewed
    as the conv kernel it is, adapted, and flattened back. Behind a space-to-depth (TResNet) each block offset has
    its own ``C`` input channels, adapted as one kernel each.
    """
    spec, s, t, fam = plan.spec, plan.source, plan.target, plan.family
    value, steps = src, []
    if src.ndim == 2:
        (ph, pw), c = s.patch_size or (1, 1), s.in_chans
        if fam.linear_patch == "chw":
            value = value.reshape(src.shape[0], c, ph, pw)
        else:
            value = value.reshape(src.shape[0], ph, pw, c).permute(0, 3, 1, 2)
    blocks = fam.space_to_depth**2 if fam.space_to_depth else 1
    if value.shape[1] != t.in_chans * blocks:
        ch = spec.adapt.channels
        out = value.shape[0]
        value = value.reshape(out * blocks, s.in_chans, *value.shape[2:])  # one C-channel kernel per block offset
        value = adapt_kernel_channels(value, t.in_chans, ch)
        value = value.reshape(out, blocks * t.in_chans, *value.shape[2:])
        how = "adapt_input_conv" if ch.method == "timm" else f"map {list(ch.map or ())}"
        per = f" per offset of the {fam.space_to_depth}x{fam.space_to_depth} space-to-depth" if blocks > 1 else ""
        steps.append(f"channels {s.in_chans} -> {t.in_chans} ({how}{per})")
    new_kernel = tuple(t.patch_size or (1, 1)) if src.ndim == 2 else tuple(tgt.shape[-2:])
    if tuple(value.shape[-2:]) != new_kernel and s.patch_size is not None:
        pm = spec.adapt.patch_embed
        old = _fmt(tuple(value.shape[-2:]))
        value = resize_patch_kernel(value, new_kernel, pm)  # type: ignore[arg-type]
        how = "PI-resize" if pm.method == "pi" else "interpolate"
        steps.append(f"kernel {old} -> {_fmt(new_kernel)} ({how}, {pm.interpolation})")  # type: ignore[arg-type]
    if src.ndim == 2:
        value = value.reshape(tgt.shape) if fam.linear_patch == "chw" else value.permute(0, 2, 3, 1).reshape(tgt.shape)
    return value, "; ".join(steps)


def _layout_hint(
    source_sd: Mapping[str, torch.Tensor], conversion: Optional[Conversion], missing: list[str], unused: list[str]
) -> str:
    """When the keys do not fit at all, say which other libraries' layouts were tried and the closest."""
    if conversion is not None or not (missing or unused):
        return ""

    return "\n" + layout_hint(source_sd)


PROGRESS_MIN_BYTES = 256 * 2**20


def _progress(target_sd: StateDict, name: str) -> Iterable[tuple[str, torch.Tensor]]:
    """Iterate the target keys, with a progress bar for large checkpoints (silenced by ``--quiet`` /
    ``huggingface_hub.utils.disable_progress_bars()`` / ``HF_HUB_DISABLE_PROGRESS_BARS=1``)."""
    size = sum(t.numel() * t.element_size() for t in target_sd.values())  # meta tensors too: read nothing
    if size < PROGRESS_MIN_BYTES:
        return target_sd.items()
    from huggingface_hub.utils import tqdm

    return tqdm(target_sd.items(), total=len(target_sd), desc=f"adapting {name}", unit="tensor", leave=False)


def adapt_state_dict(
    source_sd: StateDict, target_sd: StateDict, plan: VariantPlan, source_desc: str
) -> tuple[StateDict, AdaptationReport]:
    """Produce a state dict for the target model from the source checkpoint, accounting for every key.

    Args:
        source_sd: The checkpoint, normalised to timm's layout at the source geometry.
        target_sd: The freshly built target model's state dict (its tensors are kept for declared fresh inits).
        plan: The resolved variant plan (geometries and options).
        source_desc: Where the weights came from, for the report.

    Returns:
        The state dict to load with ``strict=True`` and the report.

    Raises:
        AdaptationError: A target key has no source, a source key is left unused without being declared, or a
            shape cannot be mapped; all offending keys are listed.
    """
    report = AdaptationReport(plan.spec.name, source_desc, plan.source.describe(), plan.target.describe())
    return dict(iter_adapted(source_sd, target_sd, plan, report)), report


def iter_adapted(
    source_sd: Mapping[str, torch.Tensor], target_sd: StateDict, plan: VariantPlan, report: AdaptationReport
) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`adapt_state_dict` one tensor at a time, in the target's key order, filling ``report`` as it goes.

    Each source tensor is read (``source_sd`` may be lazy: :class:`~timm_anysize.core.safetensors_io.LazySafetensors`)
    and adapted when its target key comes, so a consumer that writes each tensor out holds one at a time. The
    accounting errors are raised after the last tensor (a streaming writer then discards what it wrote).

    Raises:
        AdaptationError: As :func:`adapt_state_dict`, once every key has been seen.
    """
    spec, s, t = plan.spec, plan.source, plan.target
    source_desc = report.source
    # another library's layout, mapped to timm's names when it was read
    conversion = source_sd.conversion if isinstance(source_sd, SourceStateDict) else None
    out: list[tuple[str, torch.Tensor]] = []  # what record() made for the current key, yielded at once
    used: set[str] = set()
    missing, mismatched = [], []
    new_head = s.num_classes != t.num_classes

    def record(key: str, action: Action, detail: str, src: Optional[torch.Tensor], value: torch.Tensor) -> None:
        if conversion is not None and key in conversion.origin and src is not None:
            detail = "; ".join(filter(None, (f"from {conversion.origin[key]}", detail)))
        out.append((key, value))
        report.entries[key] = KeyAdaptation(
            key,
            action,
            detail,
            tuple(src.shape) if src is not None else None,
            tuple(target_sd[key].shape),  # type: ignore[arg-type]
        )
        if action != "copied":
            _logger.info("%s: %s %s: %s", spec.name, key, action, detail)

    for key, tgt in _progress(target_sd, spec.name):
        yield from out
        out.clear()
        src = source_sd.get(key)
        declared = _matches(key, spec.adapt.init_keys)
        if declared:
            record(key, "initialized", f"declared in adapt.init_keys ({declared!r})", None, tgt)
            if src is not None:
                used.add(key)
                report.dropped[key] = f"replaced by a fresh init (adapt.init_keys {declared!r})"
            continue
        if new_head and key in plan.classifier_keys:
            record(key, "initialized", f"new head: num_classes {s.num_classes} -> {t.num_classes}", None, tgt)
            if src is not None:
                used.add(key)
                report.dropped[key] = f"old head ({s.num_classes} classes)"
            continue
        if src is None:
            missing.append(key)
            continue
        used.add(key)
        layout = plan.resamples.get(key)
        if layout is not None:
            expected = plan.source_shapes.get(key)
            if expected is not None and tuple(src.shape) != expected:
                mismatched.append(_source_mismatch(key, src, expected, layout, s.describe()))
                continue
            if layout.changes or src.shape != tgt.shape:
                value, detail = resample_tensor(src, layout, tuple(tgt.shape), spec.adapt.pos_embed)
                record(key, "resampled", detail, src, value)
                continue
        if key in plan.patch_keys and (src.ndim == 4 or plan.family.linear_patch) and src.shape != tgt.shape:
            value, detail = _adapt_kernel(src, tgt, plan)
            record(key, "adapted" if s.in_chans != t.in_chans else "resampled", detail, src, value)
            continue
        if src.shape != tgt.shape:
            mismatched.append(f"{key}: checkpoint {tuple(src.shape)} vs model {tuple(tgt.shape)}")
            continue
        record(key, "copied", "", src, src)
    yield from out
    out.clear()

    unused = []
    for key in source_sd:
        if key in used:
            continue
        declared = _matches(key, spec.adapt.drop_keys)
        if declared:
            report.dropped[key] = f"declared in adapt.drop_keys ({declared!r})"
        elif key in plan.classifier_keys and t.num_classes == 0:
            report.dropped[key] = "the model has no head (num_classes=0)"
        else:
            unused.append(key)

    if conversion is not None:  # the source line names the origin, so model cards of exports do too
        report.source = f"{source_desc} ({conversion.layout} layout, mapped to timm's names)"
        report.origin = {
            "layout": conversion.layout,
            "wrappers": list(conversion.wrappers),
            "notes": list(conversion.notes),
        }
        for key, why in conversion.dropped.items():
            report.dropped[key] = f"{conversion.layout}: {why}"
    if missing or unused or mismatched:
        parts = []
        if missing:
            parts.append(f"model keys missing from the checkpoint ({len(missing)}): {summarize_keys(missing)}")
        if unused:
            parts.append(f"checkpoint keys the model does not use ({len(unused)}): {summarize_keys(unused)}")
        if mismatched:
            parts.append(f"shapes that cannot be adapted ({len(mismatched)}): {'; '.join(mismatched[:12])}")
        raise AdaptationError(
            f"{spec.name}: the weights from {source_desc} do not fit {spec.arch} ({t.describe()}):\n  "
            + "\n  ".join(parts)
            + "\nIs the checkpoint of another architecture or model_args? Keys that are unused or re-initialised on "
            "purpose can be declared in adapt.drop_keys / adapt.init_keys."
            + _layout_hint(source_sd, conversion, missing, unused)
        )
