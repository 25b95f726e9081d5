"""timm-anysize: pretrained timm vision transformers at any image size, patch size and channel count.

Importing the package registers the shipped variant configs (and those in ``$TIMM_ANYSIZE_CONFIGS``) as timm
models, so ``timm.create_model(name, pretrained=True)`` builds them with adapted weights. The import builds no model:
the YAML is parsed and schema-checked at once, and each variant is planned by its first ``timm.create_model``
(:mod:`timm_anysize.registry`). A broken ``$TIMM_ANYSIZE_CONFIGS`` file is logged as one warning line and skipped.

Every error raised for bad input is an :class:`AnysizeError` (a ``ValueError``); the subclasses below say which
input (a spec, weights, an adaptation, a registration, an input size, an export, an output folder).

Example:
    >>> import timm, timm_anysize
    >>> "vit_tiny_patch4_64" in timm.list_models("vit_tiny_patch4*")
    True
"""

from __future__ import annotations

from timm_anysize.calibration import CalibrationReport, calibrate, save_calibrated
from timm_anysize.core.atomic import FolderExistsError
from timm_anysize.core.errors import (
    AdaptationError,
    AnysizeError,
    CalibrationError,
    InputNotDivisibleError,
    InputSizeError,
    RegistrationError,
    SpecError,
    UnsupportedModelError,
    WeightsError,
)
from timm_anysize.core.input_size import InputLimits, input_limits
from timm_anysize.core.report import AdaptationReport, adaptation_report
from timm_anysize.core.spec import VariantSpec
from timm_anysize.core.version import __version__
from timm_anysize.dynamic import clear_dynamic_cache, dynamic_cache_info, enable_dynamic, is_dynamic
from timm_anysize.flexi import enable_flexi, flexi_cache_info, get_patch_size, patch_size, set_patch_size
from timm_anysize.hub import ExportError, Metric, build_model_card, export, push_to_hub
from timm_anysize.registry import (
    get_variant,
    list_variants,
    register_specs,
    register_variant,
    register_yaml,
    unregister,
    validate_variant,
)

__all__ = [
    "__version__",
    "register_yaml",
    "validate_variant",
    "register_variant",
    "register_specs",
    "unregister",
    "list_variants",
    "get_variant",
    "adaptation_report",
    "enable_dynamic",
    "is_dynamic",
    "dynamic_cache_info",
    "clear_dynamic_cache",
    "patch_size",
    "set_patch_size",
    "get_patch_size",
    "enable_flexi",
    "flexi_cache_info",
    "calibrate",
    "CalibrationReport",
    "save_calibrated",
    "CalibrationError",
    "export",
    "push_to_hub",
    "build_model_card",
    "Metric",
    "ExportError",
    "AdaptationReport",
    "VariantSpec",
    "AnysizeError",
    "SpecError",
    "UnsupportedModelError",
    "WeightsError",
    "AdaptationError",
    "RegistrationError",
    "InputNotDivisibleError",
    "InputSizeError",
    "FolderExistsError",
    "InputLimits",
    "input_limits",
]

from timm_anysize.registry import register_shipped_configs as _register_shipped_configs

_register_shipped_configs()
