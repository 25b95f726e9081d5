"""The adaptation report: how each tensor of the target model was obtained."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch.nn as nn

__all__ = [
    "KeyAdaptation",
    "AdaptationReport",
    "adaptation_report",
    "keep_report",
    "shareable_source",
    "summarize_keys",
]

Action = Literal["copied", "resampled", "adapted", "initialized"]


@dataclass(frozen=True)
class KeyAdaptation:
    """How one target tensor was obtained.

    Attributes:
        key: Target state-dict key.
        action: ``copied`` (bit-identical to the source), ``resampled`` (spatially: position grid, patch kernel),
            ``adapted`` (input channels, possibly also resampled), or ``initialized`` (fresh init, on purpose).
        detail: What was done, e.g. ``grid 14x14 -> 16x16 (bicubic, antialias)``; the reason for an init.
        source_shape: Shape in the checkpoint (None when initialised).
        target_shape: Shape in the model.
    """

    key: str
    action: Action
    detail: str
    source_shape: Optional[tuple[int, ...]]
    target_shape: tuple[int, ...]


@dataclass
class AdaptationReport:
    """Every target key with how it was obtained, plus the source keys deliberately left unused."""

    variant: str
    source: str
    source_geometry: str
    target_geometry: str
    entries: dict[str, KeyAdaptation] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    # Another library's checkpoint: {"layout": "torchvision.vit", "wrappers": [...], "notes": [...]}; None for timm's.
    origin: Optional[dict] = None

    def by_action(self, action: Action) -> list[str]:
        """Keys obtained by ``action``, in state-dict order."""
        return [k for k, e in self.entries.items() if e.action == action]

    def non_copied(self) -> list[KeyAdaptation]:
        """Entries that are not plain copies: what a reader of a model card wants to know."""
        return [e for e in self.entries.values() if e.action != "copied"]

    def summary(self) -> str:
        """A few lines: the geometries, counts per action and each non-copied key."""
        counts = {a: len(self.by_action(a)) for a in ("copied", "resampled", "adapted", "initialized")}
        lines = [
            f"{self.variant}: from {self.source}",
            f"  source: {self.source_geometry}",
            f"  target: {self.target_geometry}",
            "  " + ", ".join(f"{n} {a}" for a, n in counts.items()) + f", {len(self.dropped)} source keys dropped",
        ]
        if self.origin:
            lines.append(f"  layout: {self.origin['layout']} (mapped to timm's names)")
            lines += [f"  unwrapped: {w}" for w in self.origin.get("wrappers", ())]
            lines += [f"  note: {n}" for n in self.origin.get("notes", ())]
        lines += [f"  {e.key}: {e.action}: {e.detail}" for e in self.non_copied()]
        lines += [f"  {k}: dropped: {why}" for k, why in self.dropped.items()]
        return "\n".join(lines)

    def shareable(self) -> "AdaptationReport":
        """A copy to share (an export's card and ``anysize_report.json``): a local weight file is named by its file
        name, never by the folder it sits in on this machine (see :func:`shareable_source`)."""
        return dataclasses.replace(
            self, source=shareable_source(self.source), entries=dict(self.entries), dropped=dict(self.dropped)
        )

    def to_dict(self) -> dict:
        """A JSON-ready dict (for exports and model cards)."""
        return {
            "variant": self.variant,
            "source": self.source,
            "source_geometry": self.source_geometry,
            "target_geometry": self.target_geometry,
            "entries": {
                k: {
                    "action": e.action,
                    "detail": e.detail,
                    "source_shape": list(e.source_shape) if e.source_shape is not None else None,
                    "target_shape": list(e.target_shape),
                }
                for k, e in self.entries.items()
            },
            "dropped": dict(self.dropped),
            **({"origin": self.origin} if self.origin else {}),
        }


def adaptation_report(model: nn.Module) -> Optional[AdaptationReport]:
    """The report of how a variant's pretrained weights were obtained, or None if it was not loaded pretrained.

    Example:
        >>> import timm, timm_anysize
        >>> m = timm.create_model("vit_tiny_patch4_64")  # not pretrained: nothing to report
        >>> timm_anysize.adaptation_report(m) is None
        True
    """
    report = getattr(model, "_anysize_report", None)
    return report if isinstance(report, AdaptationReport) else None


def keep_report(model: nn.Module, report: AdaptationReport) -> None:
    """Keep on ``model`` the report of how its weights were obtained (:func:`adaptation_report` reads it)."""
    setattr(model, "_anysize_report", report)


# "file PATH", optionally followed by what adapt adds for another library's layout: " (L layout, mapped to ...)".
_FILE_SOURCE = re.compile(r"file (?P<path>.+?)(?P<rest> \([^()]* layout, mapped to timm's names\))?")


def shareable_source(source: str) -> str:
    """A report's ``source`` as what is shared may say it: a local file by its file name (the folder it sits in on
    this machine is nobody else's business); Hub ids, URLs and anything else unchanged.

    Example:
        >>> shareable_source("file /home/me/ckpt/vit.pth (torchvision.vit layout, mapped to timm's names)")
        "file vit.pth (torchvision.vit layout, mapped to timm's names)"
        >>> shareable_source("hf-hub timm/vit_tiny_patch16_224.augreg_in21k")
        'hf-hub timm/vit_tiny_patch16_224.augreg_in21k'
    """
    m = _FILE_SOURCE.fullmatch(source)
    if m is None:
        return source
    name = re.split(r"[\\/]", m.group("path"))[-1]  # POSIX or Windows separators
    return f"file {name}{m.group('rest') or ''}"


def summarize_keys(keys: list[str], limit: int = 24) -> str:
    """Keys for an error message, with numbered blocks folded: ``blocks.{2..5}.norm1.weight``.

    Example:
        >>> summarize_keys(["cls_token", "blocks.2.mlp.fc1.weight", "blocks.3.mlp.fc1.weight"])
        'cls_token, blocks.{2..3}.mlp.fc1.weight'
    """
    groups: dict[str, list[int]] = {}
    for key in keys:
        m = re.search(r"\.(\d+)\.", key)
        pattern = key[: m.start()] + ".{}." + key[m.end() :] if m else key
        groups.setdefault(pattern, []).append(int(m.group(1)) if m else -1)
    parts = []
    for pattern, idx in groups.items():
        if idx == [-1]:
            parts.append(pattern)
        elif len(idx) == 1:
            parts.append(pattern.replace("{}", str(idx[0])))
        else:
            contiguous = idx == list(range(idx[0], idx[0] + len(idx)))
            inner = f"{idx[0]}..{idx[-1]}" if contiguous else ",".join(map(str, idx))
            parts.append(pattern.replace("{}", "{" + inner + "}"))
    more = f", ... and {len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more
