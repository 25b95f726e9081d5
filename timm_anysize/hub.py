"""Portable exports (a Hub-style folder plain timm loads) and pushing them to the Hugging Face Hub.

An export is ``config.json`` (written by timm's own ``save_for_hf``: the *base* architecture plus ``model_args``
with the new geometry), ``model.safetensors`` and a ``README.md`` model card rendered by huggingface_hub from a
Jinja template, so ``timm.create_model('local-dir:DIR')`` or ``'hf-hub:REPO'`` loads it without timm-anysize, and
Hugging Face transformers loads it through ``AutoModelForImageClassification`` (its TimmWrapper).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import timm
import torch.nn as nn

from timm_anysize.calibration import calibration_of
from timm_anysize.core.atomic import atomic_folder, check_folder_free
from timm_anysize.core.attributes import module_attr
from timm_anysize.core.errors import AnysizeError
from timm_anysize.core.report import adaptation_report
from timm_anysize.core.variant_plan import VariantPlan
from timm_anysize.core.version import __version__
from timm_anysize.model_plan import plan_of, variant_plan
from timm_anysize.registry import get_variant

__all__ = ["export", "push_to_hub", "build_model_card", "Metric", "ExportError"]

LIBRARY_NAME = "timm-anysize"
TEMPLATE = Path(__file__).parent / "templates" / "modelcard.md"


class ExportError(AnysizeError):
    """A model cannot be exported (not a timm-anysize variant, or bad metadata)."""


@dataclass(frozen=True)
class Metric:
    """An evaluation result for the model card (model-index), e.g. ``Metric("top-1 accuracy", 97.2, "digits")``."""

    name: str
    value: float
    dataset: str = "custom"
    dataset_name: Optional[str] = None
    split: Optional[str] = None
    metric_type: str = "accuracy"


def _resolve_model(model_or_name: Union[str, nn.Module], file: Optional[str]) -> nn.Module:
    if isinstance(model_or_name, str):
        get_variant(model_or_name)  # a RegistrationError with a did-you-mean for names that are not variants
        overlay = dict(file=str(file)) if file else None
        model = timm.create_model(model_or_name, pretrained=True, pretrained_cfg_overlay=overlay)
        _check_plain_timm_can_build(variant_plan(model))
        return model
    if file:
        raise ExportError("file= only applies when exporting by name; load the model with those weights yourself")
    plan = plan_of(model_or_name)
    if plan is None:
        raise ExportError(
            f"{type(model_or_name).__name__} was not built by timm-anysize; create it with "
            f"timm.create_model(<variant name>) or export by name"
        )
    _check_plain_timm_can_build(plan)
    return model_or_name


def _check_plain_timm_can_build(plan: VariantPlan) -> None:
    """An export is for plain timm; refuse geometries its constructor cannot build, before anything is written."""
    (h, w) = plan.target.img_size
    if plan.family.square_only and h != w:
        raise ExportError(
            f"{plan.spec.name}: plain timm builds {plan.spec.arch} at square sizes only, so an export of this "
            f"{h}x{w} variant could not be loaded without timm-anysize; export a square variant (it runs at any "
            f"H x W with timm-anysize's dynamic path) or share the YAML and weights instead"
        )


def _metrics(metrics: Optional[Sequence[Union[Metric, dict]]]) -> list[Metric]:
    out = []
    for m in metrics or ():
        m = m if isinstance(m, Metric) else Metric(**m)
        if not isinstance(m.value, (int, float)) or not math.isfinite(m.value):
            raise ExportError(f"metric {m.name!r}: value must be a finite number, got {m.value!r}")
        out.append(m)
    return out


def _base_hub_id(model: nn.Module) -> Optional[str]:
    """The Hub id of the weights the variant was adapted from, when the source is a Hub repo."""
    plan = variant_plan(model)
    src = plan.spec.pretrained
    if src.hf_hub_id:
        return src.hf_hub_id
    if not src.has_location and plan.base_cfg.get("hf_hub_id"):
        return plan.base_cfg["hf_hub_id"]
    return None


def build_model_card(
    model: nn.Module, repo_id: Optional[str] = None, metrics: Optional[Sequence[Union[Metric, dict]]] = None
):
    """The model card (a ``huggingface_hub.ModelCard``) of a variant model.

    It names the weights the variant was adapted from by Hub id, URL or file name, never by a local path.

    Args:
        model: A model built by ``timm.create_model(<variant>)``.
        repo_id: The Hub repo it will live in (for the title and the usage snippet).
        metrics: Evaluation results, written as model-index eval results.

    Example:
        >>> import timm
        >>> card = build_model_card(timm.create_model("vit_tiny_patch4_64"))
        >>> card.data.library_name, "timm-anysize" in card.data.tags
        ('timm', True)
    """
    return _model_card(model, repo_id, metrics)


def _model_card(model: nn.Module, repo_id: Optional[str], metrics: Any, planned_source: Optional[str] = None) -> Any:
    """:func:`build_model_card`; ``planned_source`` names the weights of a model built without them (a dry run)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    plan, cfg = variant_plan(model), _pretrained_cfg(model)
    spec = plan.spec
    report = adaptation_report(model)
    base_id = _base_hub_id(model)
    metrics = _metrics(metrics)
    eval_results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=m.dataset,
            dataset_name=m.dataset_name or m.dataset,
            dataset_split=m.split,
            metric_type=m.metric_type,
            metric_name=m.name,
            metric_value=m.value,
        )
        for m in metrics
    ] or None
    card_data = ModelCardData(
        library_name="timm",
        license=cfg.get("license"),
        tags=["timm", "image-classification", LIBRARY_NAME, *spec.card.tags],
        pipeline_tag="image-classification",
        datasets=list(spec.card.datasets) or None,
        base_model=base_id,
        base_model_relation="finetune" if base_id else None,
        model_name=repo_id or spec.name,
        eval_results=eval_results,
    )
    if report is not None:
        report = report.shareable()
        changes = [(e.key, f"{e.action}: {e.detail}") for e in report.non_copied()]
        source, source_geo, target_geo = report.source, report.source_geometry, report.target_geometry
        num_copied, num_total, dropped = (
            len(report.by_action("copied")),
            len(report.entries),
            list(report.dropped.items()),
        )
    else:
        changes = [(k, f"planned (weights not loaded): {what}") for k, what in plan.steps()]
        source = planned_source or f"{spec.base} (not loaded)"
        source_geo, target_geo = plan.source.describe(), plan.target.describe()
        num_total = len(model.state_dict())
        num_copied, dropped = num_total - len(changes), []
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_id=repo_id or spec.name,
        description=cfg.get("description") or spec.card.description or "",
        base_model_name=spec.base,
        load_name=f"hf-hub:{repo_id}" if repo_id else "local-dir:/path/to/this/folder",
        hf_name=repo_id or "/path/to/this/folder",
        pil_mode=_PIL_MODES.get(cfg["input_size"][0]),
        architecture=spec.arch,
        model_args=_model_args(model),
        input_size=cfg["input_size"],
        dynamic=_plain_timm_dynamic(plan),
        anysize_dynamic=plan.dynamic and not _plain_timm_dynamic(plan),
        family_note=plan.family.card_note(model) if plan.family.card_note is not None else "",
        mean=list(cfg["mean"]),
        std=list(cfg["std"]),
        num_classes=cfg.get("num_classes"),
        source=source,
        source_geometry=source_geo,
        target_geometry=target_geo,
        changes=changes,
        dropped=dropped,
        num_copied=num_copied,
        num_total=num_total,
        metrics=metrics,
        calibration=calibration_of(cfg.get("file")),
        version=__version__,
    )


# PIL image modes whose tensors (ToTensor) have a given channel count, other than RGB.
_PIL_MODES = {1: "L", 4: "RGBA"}


def _plain_timm_dynamic(plan: VariantPlan) -> bool:
    """Whether the exported model runs at any size in plain timm (timm's own dynamic path, not ours)."""
    return plan.dynamic and plan.family.timm_dynamic


def _pretrained_cfg(model: nn.Module) -> dict[str, Any]:
    """The pretrained cfg timm (and the builder) set on the model, as the dict it is."""
    return module_attr(model, "pretrained_cfg", dict)


def _model_args(model: nn.Module) -> dict[str, Any]:
    plan = variant_plan(model)
    args = {k: v for k, v in plan.target_kwargs.items() if k not in ("device", "dtype")}
    args.update(plan.dynamic_kwargs)
    for key in ("img_size", "patch_size"):
        if isinstance(args.get(key), tuple):
            args[key] = list(args[key])
    return args


# model_args timm's save_for_hf records that are no part of the architecture: num_classes is the config's own
# top-level field (Hugging Face transformers' TimmWrapper passes it separately, and fails on a second value), and
# weight_init is how the model was initialised before its weights were loaded.
_NOT_MODEL_ARGS = ("num_classes", "weight_init")


def _clean_config(path: Path) -> None:
    """Drop loading details from config.json's ``model_args`` (see ``_NOT_MODEL_ARGS``)."""
    config = json.loads(path.read_text())
    args = config.get("model_args", {})
    for key in _NOT_MODEL_ARGS:
        args.pop(key, None)
    path.write_text(json.dumps(config, indent=2))


def _write_export(model: nn.Module, folder: Path, repo_id: Optional[str], metrics: Any) -> None:
    from timm.models import save_for_hf

    spec = variant_plan(model).spec
    model_config: dict[str, Any] = {"pretrained_cfg": {"architecture": spec.arch}}
    label_names = _pretrained_cfg(model).get("label_names")
    if label_names:
        model_config["label_names"] = list(label_names)
    save_for_hf(model, str(folder), model_config=model_config, model_args=_model_args(model), safe_serialization=True)
    _clean_config(folder / "config.json")
    report = adaptation_report(model)
    if report is not None:  # the full per-tensor account, for tools; the card has the summary
        (folder / "anysize_report.json").write_text(json.dumps(report.shareable().to_dict(), indent=2))
    build_model_card(model, repo_id, metrics).save(str(folder / "README.md"))


def export(
    model_or_name: Union[str, nn.Module],
    out_dir: Union[str, os.PathLike],
    file: Optional[Union[str, os.PathLike]] = None,
    overwrite: bool = False,
    metrics: Optional[Sequence[Union[Metric, dict]]] = None,
    repo_id: Optional[str] = None,
) -> Path:
    """Export a variant to a Hub-style folder that plain timm loads with ``timm.create_model('local-dir:...')``.

    The folder is written atomically: on any failure nothing is left behind, and an existing export is only
    replaced (after the new one is complete) when ``overwrite`` is True. An existing folder is refused before any
    weights are read. The files name the source weights by Hub id, URL or file name, never by a local path.

    Args:
        model_or_name: A variant name (loaded with ``pretrained=True``) or a model built from one.
        out_dir: The folder to write.
        file: With a name: load these weights instead of the variant's own source.
        overwrite: Replace an existing non-empty folder.
        metrics: Evaluation results for the model card.
        repo_id: The Hub repo the export is meant for (used in the card).

    Returns:
        The folder.

    Raises:
        FolderExistsError: ``out_dir`` exists and is not empty, and ``overwrite`` is False.
        RegistrationError: ``model_or_name`` is a name that is not a registered variant.
        ExportError: The model cannot be exported for plain timm.

    Example:
        >>> import tempfile, timm
        >>> out = export(timm.create_model("vit_tiny_patch4_64"), tempfile.mkdtemp() + "/vit64")
        >>> sorted(p.name for p in out.iterdir())  # no anysize_report.json: no weights were adapted
        ['README.md', 'config.json', 'model.safetensors']
        >>> timm.create_model(f"local-dir:{out}", pretrained=True).pretrained_cfg["input_size"]
        (1, 64, 64)
    """
    check_folder_free(out_dir, overwrite)  # before the weights are read: refusing takes no time, and fails nothing
    metrics = _metrics(metrics)  # validated before anything is written
    model = _resolve_model(model_or_name, str(file) if file else None)
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        _write_export(model, tmp, repo_id, metrics)
    return Path(out_dir).absolute()


def push_to_hub(
    model_or_name: Union[str, nn.Module],
    repo_id: str,
    private: bool = False,
    token: Optional[str] = None,
    file: Optional[Union[str, os.PathLike]] = None,
    metrics: Optional[Sequence[Union[Metric, dict]]] = None,
    commit_message: Optional[str] = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Export a variant and upload it to a Hub repo through ``huggingface_hub.HfApi`` (create_repo + upload_folder).

    Requests are tagged with timm-anysize's name and version.

    A dry run touches no network and writes nothing outside a temporary folder: it says which files would be
    uploaded and renders the card. Weights in a local file (the variant's ``pretrained.file``, or ``file``), or a
    model passed in, are exported for real into a temporary folder; a variant whose weights are on the Hub or at a
    URL is not downloaded: its card is rendered from the plan (the steps adaptation will take), built on the
    ``meta`` device, and ``weights`` names what a real push would download.

    Returns:
        ``{"repo_id", "files", "card", "commit_url", "weights", "weights_loaded"}``: ``commit_url`` is None for a
        dry run; ``weights`` names the source weights (a Hub id, URL or file name; None without pretrained weights)
        and ``weights_loaded`` says whether they were read (False only in a dry run of a remote source).

    Example:
        >>> r = push_to_hub("vit_tiny_patch4_64", "me/vit-tiny-64", dry_run=True)  # its weights are on the Hub
        >>> r["files"], r["weights"], r["weights_loaded"]
        (['README.md', 'anysize_report.json', 'config.json', 'model.safetensors'], 'hf-hub timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k', False)
    """
    from huggingface_hub import HfApi

    if dry_run and isinstance(model_or_name, str):
        planned = _plan_only(model_or_name, file)
        if planned is not None:
            model, planned_weights = planned
            card = str(_model_card(model, repo_id, _metrics(metrics), f"{planned_weights} (not downloaded: dry run)"))
            files = ["README.md", "anysize_report.json", "config.json", "model.safetensors"]
            return dict(
                repo_id=repo_id, files=files, card=card, commit_url=None, weights=planned_weights, weights_loaded=False
            )
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(model_or_name, Path(tmp) / "export", file=file, metrics=metrics, repo_id=repo_id)
        files = sorted(p.name for p in folder.iterdir())
        card = (folder / "README.md").read_text()
        report_path = folder / "anysize_report.json"
        weights = json.loads(report_path.read_text())["source"] if report_path.exists() else None
        commit_url = None
        if not dry_run:
            api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=__version__)
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=str(folder),
                repo_type="model",
                commit_message=commit_message or f"Upload {repo_id} (timm-anysize {__version__})",
            )
            commit_url = getattr(info, "commit_url", None) or str(info)
    return dict(repo_id=repo_id, files=files, card=card, commit_url=commit_url, weights=weights, weights_loaded=True)


def _plan_only(name: str, file: Optional[Union[str, os.PathLike]]) -> Optional[tuple[nn.Module, str]]:
    """For a dry run: the variant built on the ``meta`` device (no weights read, nothing allocated) and where its
    weights would come from, when that is the Hub or a URL; None when they are local (read them: no network)."""
    get_variant(name)  # a RegistrationError with a did-you-mean for names that are not variants
    overlay = dict(file=str(file)) if file else None
    model = timm.create_model(name, pretrained_cfg_overlay=overlay, device="meta")
    _check_plain_timm_can_build(variant_plan(model))
    cfg = _pretrained_cfg(model)
    if cfg.get("file") or cfg.get("state_dict") is not None:
        return None
    if cfg.get("hf_hub_id"):
        return model, f"hf-hub {cfg['hf_hub_id']}"
    if cfg.get("url"):
        return model, f"url {cfg['url']}"
    return None  # no pretrained weights at all: nothing to download
