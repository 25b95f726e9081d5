"""The small engine every origin layout is written in: declarative rules from source keys to timm keys.

A layout is a list of rules, each a full-match regular expression over the source keys:

- :class:`Rename` -- one source tensor becomes one timm tensor (optionally transformed, e.g. a permutation);
- :class:`Fuse` -- several source tensors (q, k, v) are concatenated into one timm tensor;
- :class:`Split` -- one source tensor becomes several timm tensors (slices), parts may be dropped with a reason;
- :class:`Drop` -- a source tensor the timm model does not have, with the reason.

:func:`apply_rules` runs the rules and records, for every timm key, where it came from, and for every source key
not carried over, why; a source key no rule matches is *unexpected* and a fusion with a missing part is *missing*.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

__all__ = ["Rename", "Fuse", "Split", "Drop", "Rule", "Conversion", "Layout", "apply_rules"]

Target = Union[str, Callable[[re.Match], str]]
Transform = Callable[[torch.Tensor], torch.Tensor]


def _target(target: Target, m: re.Match) -> str:
    return target(m) if callable(target) else target.format(**m.groupdict())


@dataclass(frozen=True)
class Rename:
    """``pattern`` (full match, named groups) -> ``target`` (a format string over the groups, or a callable)."""

    pattern: str
    target: Target
    transform: Optional[Transform] = None
    note: str = ""


@dataclass(frozen=True)
class Fuse:
    """Concatenate the tensors matched by ``parts`` (same groups, in order) along ``dim`` into ``target``."""

    parts: tuple[str, ...]
    target: Target
    dim: int = 0
    note: str = "fused"


@dataclass(frozen=True)
class Split:
    """Cut one tensor along dim 0 into ``pieces``: ``(target or None, num, start, end, why)`` takes chunks
    ``start:end`` of ``num`` equal chunks; a ``None`` target drops them, ``why`` says why."""

    pattern: str
    pieces: tuple[tuple[Optional[Target], int, int, int, str], ...]  # (target, num, start_chunk, end_chunk, why)


@dataclass(frozen=True)
class Drop:
    """A source tensor the timm model has no place for, and why."""

    pattern: str
    reason: str


Rule = Union[Rename, Fuse, Split, Drop]


@dataclass
class Conversion:
    """The result of mapping a state dict onto timm's names.

    Attributes:
        state_dict: The timm-layout tensors.
        origin: timm key -> how it was obtained, e.g. ``from 'encoder.ln.weight'`` or ``fused from q, k, v keys``.
        dropped: Source key -> why it was not carried over.
        unexpected: Source keys no rule knows.
        missing: Parts a fusion needed that the checkpoint lacks.
        layout: Name of the layout that produced it (set by the registry).
        notes: Stated differences between the origin and timm (e.g. a LayerNorm eps), for the report.
        wrappers: Containers and prefixes stripped before mapping (``teacher``, ``module.``, ...).
        model_args: timm constructor arguments the origin's numerics need (``act_layer``, ``qkv_bias``, ...); the
            variant must build its model with them.
        numerics: What the origin computes with, checked against the timm model: ``layer_norm_eps``,
            ``hidden_act`` (transformers' name).
        head_unusable: Why the origin's classifier cannot be carried over (the variant then needs a new head).
    """

    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    layout: str = ""
    notes: list[str] = field(default_factory=list)
    wrappers: list[str] = field(default_factory=list)
    model_args: dict[str, Any] = field(default_factory=dict)
    head_unusable: str = ""
    numerics: dict[str, Any] = field(default_factory=dict)

    def put(self, key: str, value: torch.Tensor, how: str) -> None:
        if key in self.state_dict:
            raise ValueError(f"two source tensors map onto {key!r} ({self.origin[key]} and {how})")
        self.state_dict[key] = value
        self.origin[key] = how

    def key_mapping(self) -> list[tuple[str, str]]:
        """(timm key, how it was obtained) pairs, for ``timm-anysize show`` and ``convert``."""
        return list(self.origin.items())


def apply_rules(state_dict: Mapping[str, torch.Tensor], rules: Sequence[Rule], label: str) -> Conversion:
    """Map ``state_dict`` through ``rules`` (first matching rule wins).

    Args:
        state_dict: Source tensors (wrappers already stripped).
        rules: The layout.
        label: The origin's name, for the ``origin`` descriptions (``torchvision``).

    Example:
        >>> import torch
        >>> sd = {"a.q": torch.ones(2), "a.k": torch.ones(2), "a.v": torch.ones(2), "extra": torch.ones(1)}
        >>> conv = apply_rules(sd, [Fuse((r"(?P<p>a)\\.q", r"(?P<p>a)\\.k", r"(?P<p>a)\\.v"), "{p}.qkv")], "demo")
        >>> conv.state_dict["a.qkv"].shape, conv.unexpected
        (torch.Size([6]), ['extra'])
    """
    conv = Conversion()
    compiled = [(r, [re.compile(p) for p in (r.parts if isinstance(r, Fuse) else (r.pattern,))]) for r in rules]
    groups: dict[tuple[int, str], dict[int, tuple[str, torch.Tensor]]] = {}
    for key, value in state_dict.items():
        for idx, (rule, regexes) in enumerate(compiled):
            hits = [(i, m) for i, rx in enumerate(regexes) if (m := rx.fullmatch(key))]
            if not hits:
                continue
            part, m = hits[0]
            if isinstance(rule, Drop):
                conv.dropped[key] = rule.reason
            elif isinstance(rule, Rename):
                out = rule.transform(value) if rule.transform else value
                note = f" ({rule.note})" if rule.note else ""
                conv.put(_target(rule.target, m), out, f"{label} {key!r}{note}")
            elif isinstance(rule, Fuse):
                groups.setdefault((idx, _target(rule.target, m)), {})[part] = (key, value)
            else:
                n = value.shape[0]
                for target, num, start, end, why in rule.pieces:
                    piece = value[n * start // num : n * end // num]
                    if target is None:
                        conv.dropped.setdefault(key, why)
                    else:
                        conv.put(
                            _target(target, m), piece.clone(), f"{label} {key!r} [{start}/{num}:{end}/{num}] ({why})"
                        )
            break
        else:
            conv.unexpected.append(key)
    for (idx, target), found in groups.items():
        rule = compiled[idx][0]
        assert isinstance(rule, Fuse)
        if len(found) != len(rule.parts):
            have = [found[i][0] for i in sorted(found)]
            conv.missing.append(f"{target} (has {', '.join(have)}; needs {len(rule.parts)} parts)")
            continue
        keys = [found[i][0] for i in range(len(rule.parts))]
        conv.put(
            target,
            torch.cat([found[i][1] for i in range(len(rule.parts))], dim=rule.dim),
            f"{label} {rule.note} from {', '.join(repr(k) for k in keys)}",
        )
    return conv


@dataclass(frozen=True)
class Layout:
    """One checkpoint layout of another library, mapped onto one timm family.

    Attributes:
        name: ``origin.model``, e.g. ``torchvision.vit`` (what ``pretrained.layout`` accepts, or its origin part).
        origin: The library (``torchvision``, ``transformers``, ``mmpretrain``, ``dino``).
        families: timm-anysize family names the weights fit (``vit``, ``swin``, ...).
        signature: Patterns each of which some key must match for the layout to be considered.
        rules: The key mapping.
        compat: The origin's own position-embedding resampling (an ``adapt.pos_embed.compat`` preset).
        finish: Optional post-processing ``(conversion, config) -> None``: checks and notes that need the whole
            checkpoint or the transformers ``config.json`` (numerics the target must match).
        prefixes: Wrapper prefixes this layout strips first when every key carries one (``module.``).
    """

    name: str
    origin: str
    families: tuple[str, ...]
    signature: tuple[str, ...]
    rules: tuple[Rule, ...]
    compat: str = "timm"
    finish: Optional[Callable[["Conversion", dict], None]] = None
    prefixes: tuple[str, ...] = ()

    def applies(self, keys: Sequence[str]) -> bool:
        """Every signature pattern matches some key."""
        return all(any(re.fullmatch(p, k) for k in keys) for p in self.signature)

    def convert(self, state_dict: Mapping[str, torch.Tensor], config: Optional[dict] = None) -> Conversion:
        """Map ``state_dict`` onto timm's names (see :func:`apply_rules`), then run ``finish``."""
        conv = apply_rules(state_dict, self.rules, self.origin)
        conv.layout = self.name
        if self.finish is not None and not conv.unexpected and not conv.missing:
            self.finish(conv, config or {})
        return conv


def fold_class_position(conv: Conversion) -> None:
    """DINOv2 with registers: the class token's position entry joins the class token, so the position embedding
    covers the patches only (timm's ``no_embed_class`` models, as timm's own DINOv2 filter does). Exact at every
    size: the origins interpolate the patch grid only."""
    pos, cls = conv.state_dict["pos_embed"], conv.state_dict["cls_token"]
    conv.state_dict["cls_token"] = cls + pos[:, :1]
    conv.state_dict["pos_embed"] = pos[:, 1:].clone()
    conv.origin["cls_token"] += " + its position entry (registers: no_embed_class)"
    conv.origin["pos_embed"] += " without the class entry (registers: no_embed_class)"
