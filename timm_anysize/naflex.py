"""A variant as timm's NaFlexVit: ``timm.create_model(variant, pretrained=True, use_naflex=True)``.

timm converts its own ViT and EVA models with ``use_naflex=True`` (``naflexvit._create_naflexvit_from_classic`` /
``_from_eva``): the same blocks behind NaFlexVit's embeddings, which take pre-patchified NaFlex batches (``patches``,
``patch_coord``, ``patch_valid``) as well as images. A variant of such a family is built as always (weights read from
any origin, adapted to its patch size, channels and grid), then its state dict is handed to the NaFlexVit of the same
configuration: the class / register tokens' position entries move into the tokens themselves (NaFlexVit adds no
position to prefix tokens), the position embedding becomes a ``[1, H, W, C]`` grid on the variant's own grid, and
timm's ``naflexvit.checkpoint_filter_fn`` maps the remaining keys (the patch kernel to its linear layout). NaFlexVit
then resamples the grid per image as the variant's run-time forward does: the same interpolation, antialiasing and
corner alignment (the ``timm``, ``torchvision``, ``transformers``, ``mmpretrain`` and ``big_vision`` presets of
:mod:`timm_anysize.core.compat`). DINO's rule (a scale factor of ``(n + 0.1) / M``, not a size) has no NaFlexVit
option: its embeddings become :class:`ScaleFactorNaFlexEmbeds`, which resample the grid per image with the variant's
own run-time function (:func:`timm_anysize.core.resample.resample_pos_tokens`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
from timm.models import naflexvit

from timm_anysize.core.attributes import module_attr
from timm_anysize.core.compat import compat_interpolation
from timm_anysize.core.errors import SpecError
from timm_anysize.core.report import adaptation_report, keep_report
from timm_anysize.core.resample import resample_pos_tokens
from timm_anysize.features import PRUNED, FeatureRequest, inner_model, wrap_up
from timm_anysize.model_plan import variant_plan

__all__ = [
    "NAFLEX_FAMILIES",
    "NAFLEX_ONLY_KWARGS",
    "ScaleFactorNaFlexEmbeds",
    "naflex_pos_embed_kwargs",
    "naflex_state_dict",
    "to_naflex",
]

# Families timm builds as NaFlexVit with use_naflex=True (naflexvit: it is one already).
NAFLEX_FAMILIES = ("vit", "eva", "naflexvit")
# NaFlexVit arguments a classic ViT/EVA does not take, passed to the NaFlexVit a variant becomes (timm's train.py
# --naflex-patch-sizes needs --model-kwargs use_naflex=True enable_patch_interpolator=True, as for timm's own ViTs).
NAFLEX_ONLY_KWARGS = ("enable_patch_interpolator",)


def naflex_pos_embed_kwargs(compat: str, interpolation: str, antialias: bool) -> dict[str, Any]:
    """NaFlexVit's position-embedding options that resample its grid as a variant's run-time forward does.

    Args:
        compat: The variant's ``adapt.pos_embed.compat`` preset.
        interpolation: Its ``adapt.pos_embed.interpolation`` (read for the ``timm`` preset only).
        antialias: Its antialiasing (``timm`` preset only).

    Returns:
        ``pos_embed_interp_mode``, ``pos_embed_antialias`` and ``pos_embed_align_corners``. A preset that scales the
        grid by a factor (DINO) needs :class:`ScaleFactorNaFlexEmbeds` as well: NaFlexVit resamples to a size.

    Example:
        >>> naflex_pos_embed_kwargs("big_vision", "bicubic", True)
        {'pos_embed_interp_mode': 'bilinear', 'pos_embed_antialias': False, 'pos_embed_align_corners': True}
    """
    if compat == "timm":
        mode, aa, corners = interpolation, antialias, False
    else:
        mode, aa, corners, _ = compat_interpolation(compat)
    return dict(pos_embed_interp_mode=mode, pos_embed_antialias=aa, pos_embed_align_corners=corners)


class ScaleFactorNaFlexEmbeds(naflexvit.NaFlexEmbeds):
    """NaFlexVit's embeddings for a preset that resamples the position grid with a scale factor rather than to a
    size (DINO: ``scale_factor=(n + 0.1) / M``, which samples the grid at other points than a resize to ``n``). Each
    image's grid is resampled with :func:`~timm_anysize.core.resample.resample_pos_tokens`, the function the
    variant's dynamic forward calls, so a NaFlex batch gets the dynamic forward's numbers. :func:`to_naflex` gives a
    DINO variant's NaFlexVit this class; its NaFlex batches and plain images both take this path.

    Attributes:
        compat: The ``adapt.pos_embed.compat`` preset whose rule this module applies.
    """

    compat: str = "dino"

    def _grid_pos_tokens(self, grid: Tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """``[1, h*w, C]``: the stored ``[1, H, W, C]`` grid resampled to ``grid`` by the preset's rule."""
        grid_embed = module_attr(self, "pos_embed", torch.Tensor)  # a learned grid: NaFlexVit types it Optional
        _, h, w, dim = grid_embed.shape
        tokens = grid_embed.reshape(1, h * w, dim)
        mode, antialias, _, _ = compat_interpolation(self.compat)
        return resample_pos_tokens(tokens, [grid[0], grid[1]], [h, w], 0, mode, antialias, self.compat).to(dtype)

    def _apply_learned_pos_embed(self, x: torch.Tensor, grid_size: List[int]) -> None:
        x.add_(self._grid_pos_tokens((int(grid_size[0]), int(grid_size[1])), x.dtype))

    @torch.compiler.disable
    def _apply_learned_naflex_pos_embed(self, x: torch.Tensor, patch_coord: torch.Tensor) -> None:
        # As timm's: one resampling per distinct grid in the batch, added to the images of that grid (row-major
        # tokens; the padding past a grid's tokens is left as it is).
        by_grid: Dict[Tuple[int, int], List[int]] = {}
        for i, grid in enumerate(naflexvit.calculate_naflex_grid_sizes(patch_coord)):
            by_grid.setdefault((int(grid[0]), int(grid[1])), []).append(i)
        for grid, rows in by_grid.items():
            pos = self._grid_pos_tokens(grid, x.dtype)
            n = min(x.shape[1], pos.shape[1])
            x[:, :n].index_add_(0, torch.as_tensor(rows, device=x.device), pos[:, :n].expand(len(rows), -1, -1))

    def _apply_learned_naflex_pos_embed_grid_sample(self, x: torch.Tensor, patch_coord: torch.Tensor) -> None:
        self._apply_learned_naflex_pos_embed(x, patch_coord)  # grid_sample cannot express a scale factor's points


def naflex_state_dict(
    state_dict: dict[str, torch.Tensor], model: naflexvit.NaFlexVit, prefix: int
) -> dict[str, torch.Tensor]:
    """A ViT / EVA state dict in NaFlexVit's layout, for ``model`` (the NaFlexVit); ``state_dict`` is not modified.

    Args:
        state_dict: The classic model's state dict (its ``pos_embed`` ``[1, prefix + H*W, C]`` on the NaFlexVit's
            ``embeds.pos_embed`` grid).
        model: The NaFlexVit it is for.
        prefix: Leading ``pos_embed`` entries that belong to the class and register tokens (0: ``no_embed_class``).

    Example:
        >>> m = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, use_naflex=True)
        >>> sd = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1).state_dict()
        >>> naflex_state_dict(sd, m, prefix=1)["embeds.pos_embed"].shape
        torch.Size([1, 2, 2, 192])
    """
    # Copies: timm's filter adds the class token's position into the cls_token it is given, in place.
    sd = {k: v.detach().clone() for k, v in state_dict.items()}
    pos = sd.pop("pos_embed", None)
    if pos is not None:
        grid = module_attr(model.get_submodule("embeds"), "pos_embed", torch.Tensor).shape[1:3]
        tokens = [k for k in ("cls_token", "reg_token") if k in sd]
        at = 0
        for key in tokens:  # ViT order: the class token, then the registers, each with its own position entries
            n = sd[key].shape[1]
            if at + n <= prefix:
                sd[key] = sd[key] + pos[:, at : at + n]
                at += n
        sd["pos_embed"] = pos[:, prefix:].reshape(1, grid[0], grid[1], pos.shape[-1])
    return naflexvit.checkpoint_filter_fn(sd, model)


def to_naflex(model: nn.Module, features: Optional[FeatureRequest] = None, **naflex_kwargs: Any) -> nn.Module:
    """The NaFlexVit form of a built variant (``use_naflex=True``): the same configuration and weights.

    Args:
        model: A variant built by timm-anysize (its plan names the base, family and geometry).
        features: ``features_only=True`` with it: timm's feature wrapper of the NaFlexVit (its ``getter``, pruned
            past the last index, as timm builds one for its own NaFlexVit), holding the converted weights.
        **naflex_kwargs: NaFlexVit arguments of its own (:data:`NAFLEX_ONLY_KWARGS`).

    Returns:
        A NaFlexVit (or its feature wrapper) carrying the variant's ``pretrained_cfg``; the model itself where it is
        one already.

    Raises:
        SpecError: The family has no NaFlexVit form (the message names those that have), the model has a
            distillation token or an attention-pool head, or ``features`` asks for a feature class that does not
            hold the NaFlexVit whole.

    Example:
        >>> import timm_anysize
        >>> name = timm_anysize.register_variant("naflex_doc_vit", base="test_vit", img_size=48)
        >>> type(timm.create_model(name, use_naflex=True)).__name__
        'NaFlexVit'
        >>> [f.shape for f in timm.create_model(name, use_naflex=True, features_only=True)(torch.rand(1, 3, 48, 48))]
        [torch.Size([1, 64, 3, 3]), torch.Size([1, 64, 3, 3]), torch.Size([1, 64, 3, 3])]
    """
    plan = variant_plan(model)
    family = plan.family
    if family.name == "naflexvit" or isinstance(model, naflexvit.NaFlexVit):
        return model
    if family.name not in NAFLEX_FAMILIES:
        raise SpecError(
            f"{plan.spec.name}: use_naflex=True: timm has no NaFlexVit form of the {family.name} family "
            f"({plan.spec.base}); families it converts: {', '.join(NAFLEX_FAMILIES)}"
        )
    if getattr(model, "dist_token", None) is not None or getattr(model, "attn_pool", None) is not None:
        raise SpecError(
            f"{plan.spec.name}: use_naflex=True: a distillation token or attention-pool head has no "
            f"NaFlexVit form in timm; families it converts: {', '.join(NAFLEX_FAMILIES)}"
        )
    pe = plan.spec.adapt.pos_embed
    kwargs = {k: v for k, v in plan.target_kwargs.items() if k not in ("dynamic_img_size", "dynamic_img_pad")}
    kwargs.update(naflex_pos_embed_kwargs(pe.compat, pe.interpolation, pe.use_antialias), **naflex_kwargs)
    if features is not None:  # timm builds and wraps it, as for its own NaFlexVit
        kwargs.update(features_only=True, **features.timm_kwargs)
    param = next(model.parameters())
    with torch.device(param.device):
        built = timm.create_model(
            plan.spec.base, pretrained=False, use_naflex=True, dynamic_img_pad=plan.spec.pad, **kwargs
        )
    naflex = inner_model(built) if features is not None else built
    if not isinstance(naflex, naflexvit.NaFlexVit):  # only a feature wrapper can hold something else
        raise SpecError(
            f"{plan.spec.name}: use_naflex=True, features_only=True: timm's feature_cls "
            f"{features.timm_kwargs.get('feature_cls') if features else None!r} does not hold the NaFlexVit whole; "
            f"leave feature_cls out (timm's 'getter')"
        )
    built.to(dtype=param.dtype)
    prefix = family.pos_embed_prefix_tokens(model)
    converted = naflex_state_dict(model.state_dict(), naflex, prefix)
    own = naflex.state_dict()
    # what timm's feature wrapper pruned (later blocks, the final norm, the head); without one, every key loads
    pruned = converted.keys() - own.keys() if features is not None else set()
    naflex.load_state_dict({k: v for k, v in converted.items() if k not in pruned}, strict=True)
    if pe.compat == ScaleFactorNaFlexEmbeds.compat:  # DINO: a scale factor, which NaFlexVit's options cannot say
        naflex.embeds.__class__ = ScaleFactorNaFlexEmbeds
    built.train(model.training)
    report = adaptation_report(model)
    if features is not None:
        if report is not None:
            report.dropped.update({key: PRUNED for key in sorted(pruned)})
        return wrap_up(built, dict(module_attr(model, "pretrained_cfg", dict)), report, dynamic=True)
    naflex.pretrained_cfg = naflex.default_cfg = model.pretrained_cfg
    if report is not None:
        keep_report(naflex, report)
    return naflex
