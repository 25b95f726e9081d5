"""What ``timm.create_model(name, pretrained=True)`` will need of a variant's weight source, checked without building
the model, reading the weights or touching the network (``timm-anysize check``): the local weight file exists, a Hub
id is a valid repo id, and a transformers ``config.json`` beside the weights agrees with the variant's source geometry.

The geometry itself is checked by :func:`timm_anysize.plan.make_plan`; this module adds what only the weight read
would find out.
"""

from __future__ import annotations

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from timm_anysize.core.errors import AnysizeError, one_line
from timm_anysize.core.spec import VariantSpec
from timm_anysize.origins import config_geometry, reads_transformers_config
from timm_anysize.plan import VariantPlan
from timm_anysize.weight_files import transformers_config

__all__ = ["weight_source_problems"]


def weight_source_problems(spec: VariantSpec, plan: VariantPlan) -> list[str]:
    """The problems ``timm.create_model(spec.name, pretrained=True)`` would meet in the variant's weight source, one
    line each, naming the file, the variant and the key; empty when there are none.

    Checked: ``pretrained.file`` exists; ``pretrained.hf_hub_id`` is a valid Hub repo id (nothing is downloaded);
    the transformers ``config.json`` beside a local file (or in a ``save_pretrained`` folder) is readable JSON and
    states the same source ``image_size``, ``patch_size`` and ``num_channels`` as the variant.

    Args:
        spec: The variant.
        plan: Its plan (:func:`timm_anysize.plan.make_plan`), whose source geometry the ``config.json`` must match.

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> from timm_anysize.plan import make_plan
        >>> spec = parse_variant("v", {"base": "test_vit", "pretrained": {"file": "/nonexistent/w.safetensors"}})
        >>> weight_source_problems(spec, make_plan(spec))
        ['<dict>: v: pretrained.file /nonexistent/w.safetensors: no such file or folder']
    """
    src, where = spec.pretrained, spec.where
    problems = []
    if src.file is not None and not src.file.exists():
        problems.append(f"{where}: pretrained.file {src.file}: no such file or folder")
    if src.hf_hub_id is not None:
        try:
            validate_repo_id(src.hf_hub_id)
        except HFValidationError as e:
            problems.append(f"{where}: pretrained.hf_hub_id {src.hf_hub_id!r} is not a Hub repo id ({one_line(e)})")
    if src.file is not None and src.file.exists() and reads_transformers_config(src.layout):
        try:
            config = transformers_config(src.file)
        except AnysizeError as e:  # an unreadable config.json: the weight read would refuse it
            problems.append(f"{where}: {one_line(e)}")
            config = None
        problems += _config_contradictions(where, config, plan)
    return problems


def _config_contradictions(where: str, config: dict | None, plan: VariantPlan) -> list[str]:
    """What a transformers ``config.json`` states against the plan's source geometry (which it filled in where the
    spec left a field unset, so a difference is a field the spec sets otherwise)."""
    stated, source = config_geometry(config), plan.source
    problems = []
    for key, field, ours in (
        ("img_size", "image_size", source.img_size),
        ("patch_size", "patch_size", source.patch_size),
    ):
        theirs = stated.get(key)
        if theirs is not None and ours is not None and tuple(ours) != tuple(theirs):
            problems.append(
                f"{where}: pretrained.{key}: config.json beside the weights says {field} {list(theirs)}, the "
                f"variant's source geometry is {list(ours)}; set pretrained.{key}: {list(theirs)}, or leave it out"
            )
    if stated.get("in_chans") not in (None, source.in_chans):
        problems.append(
            f"{where}: pretrained.in_chans: config.json beside the weights says num_channels {stated['in_chans']}, "
            f"the variant's source has {source.in_chans}; set pretrained.in_chans: {stated['in_chans']}"
        )
    return problems
