"""A variant's plan: its spec resolved against timm -- the base, the family row, the source and target
geometries, the kwargs of both models, the layout of every geometry-dependent tensor and what the model costs --
everything the later steps (adaptation, the weights' read, the build) need. Made by :func:`timm_anysize.plan.make_plan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch.nn as nn

from timm_anysize.core.family import Family
from timm_anysize.core.geometry import Geometry, TensorResample
from timm_anysize.core.memory import CostEstimate
from timm_anysize.core.report import summarize_keys
from timm_anysize.core.spec import Size2, VariantSpec

__all__ = ["VariantPlan"]


@dataclass(frozen=True)
class VariantPlan:
    """A spec resolved against timm: everything needed to build the model and adapt the weights."""

    spec: VariantSpec
    family: Family
    base_cfg: dict[str, Any]
    source: Geometry
    target: Geometry
    source_kwargs: dict[str, Any] = field(repr=False)
    target_kwargs: dict[str, Any] = field(repr=False)
    dynamic: bool = True
    source_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)  # timm's layout, by key
    resamples: dict[str, TensorResample] = field(default_factory=dict, repr=False)
    feature_size: Optional[Size2] = None  # H x W of forward_features at the target size, where the base has pool_size
    # The transformers config.json that speaks for the weights (read once, when the plan was made): its geometry
    # filled the spec's unset pretrained fields, and the weights' read checks the checkpoint against it.
    config: Optional[dict[str, Any]] = field(default=None, repr=False, compare=False)
    # What the source model computes (origins.model_numerics): checked against an origin's stated numerics.
    source_numerics: dict[str, tuple] = field(default_factory=dict, repr=False)
    # What the target model costs in memory (parameters, every buffer, the largest attention map of one image).
    cost: Optional[CostEstimate] = field(default=None, repr=False, compare=False)
    # The model at the source geometry, on meta, as the plan built it: timm's checkpoint filters read its shapes.
    source_model: Optional[nn.Module] = field(default=None, repr=False, compare=False)

    @property
    def dynamic_kwargs(self) -> dict[str, bool]:
        """timm constructor args for the resolved dynamic/pad choice (said explicitly either way: some timm archs
        default to dynamic, and EVA builds its RoPE for it); none for families whose constructors lack them."""
        return self.family.dynamic_kwargs(self.dynamic, self.spec.pad)

    @property
    def square_only(self) -> bool:
        """The base's timm constructor takes square sizes only (MViTv2): a non-square target is built square and
        its width tables refitted (:func:`timm_anysize.families.mvitv2.create_square_only`)."""
        return self.family.square_only

    @property
    def patch_keys(self) -> tuple[str, ...]:
        """State-dict keys of the first kernel(s) the input meets: the patch projection (one per branch for
        CrossViT), or a conv stem's first convolution. Their input channels are adapted; patch kernels resized."""
        names = self.family.first_conv or self.base_cfg.get("first_conv") or "patch_embed.proj"
        names = (names,) if isinstance(names, str) else tuple(names)
        return tuple(f"{n}.weight" for n in names)

    @property
    def patch_key(self) -> str:
        """State-dict key of the (first) patch-embedding kernel."""
        return self.patch_keys[0]

    @property
    def classifier_keys(self) -> tuple[str, ...]:
        """State-dict keys of the classifier head(s), from the base's pretrained cfg."""
        names = self.base_cfg.get("classifier") or "head"
        names = (names,) if isinstance(names, str) else tuple(names)
        return tuple(f"{n}.{p}" for n in names for p in ("weight", "bias"))

    def steps(self) -> list[tuple[str, str]]:
        """The non-copy steps adaptation will take, as (key, description), before any weights are read."""

        s, t, spec = self.source, self.target, self.spec
        out = []
        by_change: dict[tuple[str, tuple[int, ...], tuple[int, ...]], list[str]] = {}
        for key, r in self.resamples.items():
            if r.changes:
                by_change.setdefault((r.kind, r.source, r.target), []).append(key)
        pe = spec.adapt.pos_embed
        for (kind, a, b), keys in by_change.items():
            what = _KIND_STEP[kind].format(a="x".join(map(str, a)), b="x".join(map(str, b)))
            if kind == "pos_tokens":
                prefix = self.resamples[keys[0]].prefix
                what += f" ({pe.interpolation}, antialias={pe.use_antialias}, {prefix} prefix kept)"
            out.append((summarize_keys(keys), what))
        if s.patch_size != t.patch_size and s.patch_size is not None and t.patch_size is not None:
            pm = spec.adapt.patch_embed
            out.append(
                (
                    ", ".join(self.patch_keys),
                    f"resize kernel {s.patch_size[0]}x{s.patch_size[1]} -> {t.patch_size[0]}x{t.patch_size[1]} "
                    f"({'FlexiViT PI-resize' if pm.method == 'pi' else 'plain interpolation'}, {pm.interpolation})",
                )
            )
        if s.in_chans != t.in_chans:
            ch = spec.adapt.channels
            how = "timm adapt_input_conv" if ch.method == "timm" else f"channel map {list(ch.map or ())}"
            out.append((", ".join(self.patch_keys), f"adapt input channels {s.in_chans} -> {t.in_chans} ({how})"))
        if s.num_classes != t.num_classes:
            for key in self.classifier_keys:
                out.append((key, f"new head: num_classes {s.num_classes} -> {t.num_classes}"))
        for pattern in spec.adapt.init_keys:
            out.append((pattern, "left at fresh initialisation (adapt.init_keys)"))
        for pattern in spec.adapt.drop_keys:
            out.append((pattern, "source keys dropped (adapt.drop_keys)"))
        return out


_KIND_STEP = {
    "pos_tokens": "resample grid {a} -> {b}",
    "pos_nchw": "resample grid {a} -> {b}",
    "pos_nhwc": "resample grid {a} -> {b}",
    "rel_table": "resize relative-position tables, window {a} -> {b}",
    "bias_grid": "resize attention-bias grids {a} -> {b}",
    "rel_axis": "resize relative-position axes {a} -> {b} entries (linear)",
    "pos_blocks": "resample blocked grid {a} -> {b}",
}
