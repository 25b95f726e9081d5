"""Registering variant specs as real timm models (entrypoint + pretrained cfg), through timm's public
``register_model`` and ``generate_default_cfgs``.

Registration is all-or-nothing per call, idempotent for an identical spec, and thread-safe. A name registered with
a different spec is refused unless ``overwrite=True`` asks to replace it (a notebook cell run again after an edit);
:func:`unregister` removes a variant from timm-anysize and from timm's registry.

When a variant is checked:

- A YAML file is always parsed and validated against the schema when it is registered: a bad key or value raises
  :class:`~timm_anysize.SpecError` naming the file, the variant and the key, and nothing of the file is registered.
- ``register_yaml`` / ``register_variant`` / ``register_specs`` (a user registering variants) also plan each variant
  at once -- two models built on the ``meta`` device -- so an impossible geometry, an unknown base or bad
  ``model_args`` raise there and then, as timm users expect of a model they just declared.
- ``import timm_anysize`` builds no model: the shipped variants and the files of ``$TIMM_ANYSIZE_CONFIGS`` are
  registered with ``validate=False``, from the spec and the base's pretrained cfg alone (an unknown base or tag
  still raises). Their plan is made by the first ``timm.create_model`` of the variant, which raises the same
  ``SpecError`` registration would have, and ``timm-anysize check FILE`` makes it for every variant of a file.
  The registered pretrained cfg (``timm.models.get_pretrained_cfg``) is right before that: input size, channels,
  mean/std, classes and ``fixed_input_size`` come from the spec; what only a built model tells (``pool_size``, the
  grid in the description) is added to timm's registration when the plan is made.
"""

from __future__ import annotations

import difflib
import logging
import os
import threading
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import timm
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from timm_anysize import variants as _variants_module
from timm_anysize.builder import build_variant
from timm_anysize.core.errors import AnysizeError, RegistrationError, one_line
from timm_anysize.core.spec import VariantSpec, parse_variant
from timm_anysize.core.timm_private import unregister_model
from timm_anysize.plan import forget_plans, made_plan, make_plan
from timm_anysize.pretrained_cfg import default_tag, spec_pretrained_cfg, variant_pretrained_cfg
from timm_anysize.yaml_config import load_yaml_specs

__all__ = [
    "register_yaml",
    "register_variant",
    "register_specs",
    "unregister",
    "list_variants",
    "get_variant",
    "register_shipped_configs",
    "CONFIGS_ENV",
]

CONFIGS_ENV = "TIMM_ANYSIZE_CONFIGS"
_log = logging.getLogger(__name__)
_lock = threading.RLock()
_specs: dict[str, VariantSpec] = {}
_unplanned: set[str] = set()  # registered with validate=False: planned (and their cfg completed) on first use


def _entrypoint(spec: VariantSpec) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        model = build_variant(spec, pretrained=pretrained, **kwargs)  # plans the variant: a bad spec raises here
        _plan_registered(spec, made_only=True)  # its registered cfg completed where that plan was the spec's own
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = spec.name
    entrypoint.__module__ = _variants_module.__name__
    entrypoint.__doc__ = f"{spec.name}: {spec.base} at a new geometry (timm-anysize variant from {spec.origin})."
    return entrypoint


def check_name(spec: VariantSpec, batch: dict[str, VariantSpec], overwrite: bool = False) -> bool:
    """True if the spec needs registering; False if the identical spec already is. Raises on a conflict.

    With ``overwrite``, a variant registered earlier under the name with a different spec is to be replaced (True);
    two different specs of one name in the same batch, or a name of timm's own models, are still refused.
    """
    where = spec.where
    if spec.name in batch and not batch[spec.name].same_as(spec):
        clash = batch[spec.name]
        raise RegistrationError(
            f"{where}: the name is given twice with different specs (also in {clash.origin or '<dict>'}); "
            f"rename one of them"
        )
    other = _specs.get(spec.name) or batch.get(spec.name)
    if other is not None:
        if other.same_as(spec):
            return False
        if overwrite and spec.name in _specs:
            return True
        raise RegistrationError(
            f"{where}: the name is already registered with a different spec (from {other.origin or '<dict>'}); "
            f"rename one of them, or pass overwrite=True to replace it"
        )
    if timm.is_model(spec.name):
        raise RegistrationError(f"{where}: the name collides with timm's built-in model {spec.name!r}; rename it")
    return True


def _publish(spec: VariantSpec, cfg: dict[str, Any], fn: Optional[Callable[..., nn.Module]] = None) -> None:
    """Register (or re-register: a completed cfg, or a replaced spec) the entrypoint and pretrained cfg of a variant
    with timm. Without ``fn`` a new entrypoint is made for ``spec``."""
    _variants_module.default_cfgs.update(generate_default_cfgs({f"{spec.name}.{default_tag(spec)}": cfg}))
    if fn is None:
        fn = _entrypoint(spec)
        setattr(_variants_module, spec.name, fn)
    with warnings.catch_warnings():  # timm overwrites a registration and its cfgs, and says so
        warnings.filterwarnings("ignore", message=f"Overwriting {spec.name} in registry", category=UserWarning)
        register_model(fn)


def _plan_registered(spec: VariantSpec, made_only: bool = False) -> None:
    """The plan of a variant registered unplanned (``validate=False``): made (and cached) on its first use, raising
    what registration would have; its registered pretrained cfg then gets what only the plan knows. ``made_only``:
    only where a ``create_model`` made that plan already (one without overrides or other weights' config.json)."""
    if spec.name not in _unplanned:
        return
    plan = made_plan(spec) if made_only else make_plan(spec)  # SpecError: as a validating registration raises
    if plan is None:
        return
    cfg = variant_pretrained_cfg(plan)
    with _lock:
        if spec.name in _unplanned and _specs.get(spec.name) is spec:
            if cfg != spec_pretrained_cfg(spec):
                _publish(spec, cfg, getattr(_variants_module, spec.name))
            _unplanned.discard(spec.name)


def register_specs(specs: Iterable[VariantSpec], validate: bool = True, overwrite: bool = False) -> list[str]:
    """Register validated specs as timm models. Either all are registered or none is.

    Args:
        specs: Variant specs, e.g. from ``timm_anysize.yaml_config.load_yaml_specs``.
        validate: Plan every spec now (two models built on the ``meta`` device each), so a geometry timm cannot
            build raises here. False: register from the spec and the base's pretrained cfg alone (no model built);
            the plan is made, with the same errors, by the variant's first ``timm.create_model`` (what
            ``import timm_anysize`` does for the shipped variants).
        overwrite: Replace a variant registered earlier under the same name with a different spec: timm's
            registration and pretrained cfg become the new spec's, and its plan is made again. False (the default)
            refuses a silent change.

    Returns:
        The names, in order (including any that were already registered with the identical spec).

    Raises:
        RegistrationError: A name collides with a timm model, or with a different spec (without ``overwrite``).
        SpecError: A spec cannot be resolved against timm (unknown base or tag; with ``validate``, also an
            impossible geometry or bad ``model_args``).

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> register_specs([parse_variant("doc_vit_40", {"base": "test_vit", "img_size": 40})], validate=False)
        ['doc_vit_40']
    """
    specs = list(specs)
    with _lock:
        batch: dict[str, VariantSpec] = {}
        ready: list[tuple[VariantSpec, dict[str, Any]]] = []
        for spec in specs:  # everything that can fail happens here, before anything is registered
            if check_name(spec, batch, overwrite):
                batch[spec.name] = spec
                cfg = variant_pretrained_cfg(make_plan(spec)) if validate else spec_pretrained_cfg(spec)
                ready.append((spec, cfg))
            elif validate and spec.name in _unplanned:
                _plan_registered(_specs[spec.name])  # registered unplanned before: validated now
        for spec, cfg in ready:
            replaced = _specs.get(spec.name)
            if replaced is not None:  # overwrite: the old spec's plans go with it
                forget_plans(replaced)
            _publish(spec, cfg)
            _specs[spec.name] = spec
            if validate:
                _unplanned.discard(spec.name)  # a replaced spec registered unplanned before
            else:
                _unplanned.add(spec.name)
    return [s.name for s in specs]


def register_yaml(path: Union[str, os.PathLike], validate: bool = True, overwrite: bool = False) -> list[str]:
    """Register every variant of a YAML file as a timm model.

    The file is parsed and validated at once; with ``validate`` (the default) every variant is also planned at once,
    so a geometry timm cannot build raises here rather than at its first ``timm.create_model``.

    Args:
        path: A YAML file with a ``variants:`` mapping. Relative weight paths resolve against its folder.
        validate: Plan every variant now (see :func:`register_specs`); False builds no model.
        overwrite: Replace variants registered earlier under the same names with different specs (a file edited
            and registered again, in a notebook); False refuses a changed spec.

    Returns:
        The registered names.

    Raises:
        SpecError: The file or a variant is invalid (message names the file, the variant and the key).
        RegistrationError: A name collides; nothing from the file is registered then.

    Example:
        >>> import tempfile, pathlib, timm
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "v.yaml"
        >>> _ = p.write_text("variants:\\n  doc_vit_48:\\n    base: test_vit\\n    img_size: 48\\n")
        >>> register_yaml(p)
        ['doc_vit_48']
        >>> timm.create_model("doc_vit_48").pretrained_cfg["input_size"]
        (3, 48, 48)
    """
    return register_specs(load_yaml_specs(path), validate=validate, overwrite=overwrite)


def register_variant(name: str, overwrite: bool = False, **spec: Any) -> str:
    """Register one variant from keyword arguments (the same keys as in YAML), planned at once (errors raise here).

    Args:
        name: The variant's name.
        overwrite: Replace a variant registered earlier under ``name`` with a different spec (a notebook cell run
            again after an edit); False (the default) raises :class:`~timm_anysize.RegistrationError` instead.
        **spec: The spec's keys (``base``, ``img_size``, ``patch_size``, ``in_chans``, ``pretrained``, ...).

    Example:
        >>> register_variant("doc_vit_64_gray", base="test_vit", img_size=64, patch_size=8, in_chans=1)
        'doc_vit_64_gray'
        >>> register_variant("doc_vit_64_gray", base="test_vit", img_size=64, patch_size=16, in_chans=1, overwrite=True)
        'doc_vit_64_gray'
        >>> timm.create_model("doc_vit_64_gray").patch_embed.grid_size
        (4, 4)
    """
    return register_specs([parse_variant(name, spec)], overwrite=overwrite)[0]


def unregister(name: str) -> None:
    """Remove a variant: from timm-anysize (``list_variants``) and from timm's registry (``timm.list_models``,
    ``timm.create_model`` and its pretrained cfgs). Models built from it before keep working.

    Raises:
        RegistrationError: ``name`` is not a registered variant (the message lists close names).

    Example:
        >>> _ = register_variant("doc_vit_gone", base="test_vit", img_size=32, patch_size=8)
        >>> unregister("doc_vit_gone")
        >>> "doc_vit_gone" in list_variants(), timm.is_model("doc_vit_gone")
        (False, False)
    """
    with _lock:
        spec = get_variant(name)
        forget_plans(spec)
        unregister_model(spec.name)
        del _specs[spec.name]
        _unplanned.discard(spec.name)
        if hasattr(_variants_module, spec.name):
            delattr(_variants_module, spec.name)
        if spec.name in _variants_module.__all__:
            _variants_module.__all__.remove(spec.name)
        _variants_module.default_cfgs.pop(spec.name, None)


def validate_variant(name: str) -> None:
    """Plan a registered variant now: what its first ``timm.create_model`` would do for one registered unplanned
    (``validate=False``, as the shipped configs are), raising the same :class:`~timm_anysize.SpecError`. Its
    registered pretrained cfg then has what only the plan knows (``pool_size``, ``min_input_size``), so
    ``timm.get_pretrained_cfg(name)`` no longer depends on whether the model was created first. Cached: a second
    call, or one for a variant registered validated, returns at once.

    Raises:
        RegistrationError: ``name`` is not a registered variant.
        SpecError: The geometry cannot be built.

    Example:
        >>> validate_variant("vit_tiny_patch4_64")
        >>> timm.get_pretrained_cfg("vit_tiny_patch4_64").input_size
        (1, 64, 64)
    """
    _plan_registered(get_variant(name))


def list_variants() -> list[str]:
    """Names of the registered variants, sorted.

    Example:
        >>> "vit_tiny_patch4_64" in list_variants()
        True
    """
    with _lock:
        return sorted(_specs)


def get_variant(name: str) -> VariantSpec:
    """The spec a variant was registered with (immutable).

    Raises:
        RegistrationError: ``name`` is not a registered variant; the message lists close names.

    Example:
        >>> get_variant("vit_tiny_patch4_64").patch_size
        (4, 4)
    """
    with _lock:
        spec = _specs.get(timm.models.get_arch_name(name))
        if spec is not None:
            return spec
        close = difflib.get_close_matches(name, list(_specs), n=3)
        raise RegistrationError(
            f"{name!r} is not a timm-anysize variant; "
            + (f"did you mean {' or '.join(close)}?" if close else "list_variants() names them")
        )


def _shipped_config_files() -> list[Path]:
    root = resources.files("timm_anysize.configs")
    return sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml"))


def register_shipped_configs(env: Optional[str] = None) -> list[str]:
    """Register the configs shipped in the package, then the files listed in ``$TIMM_ANYSIZE_CONFIGS``.

    Called on ``import timm_anysize``; safe to call again (identical specs are skipped). Builds no model: the files
    are parsed and validated, and each variant is planned by its first ``timm.create_model`` (``validate=False``).
    A broken file of ``$TIMM_ANYSIZE_CONFIGS`` does not break the import (nor the command line's ``--help``): none
    of its variants is registered, the other files' are, and its error (naming the file and the key) is logged as
    one warning line; ``timm-anysize check`` reports it again and exits 1.

    Args:
        env: The ``os.pathsep``-separated files (None: ``$TIMM_ANYSIZE_CONFIGS``).

    Returns:
        The registered names.

    Example:
        >>> "vit_tiny_patch4_64" in register_shipped_configs(env="")
        True
        >>> "vit_tiny_patch4_64" in register_shipped_configs(env="/nonexistent/mine.yaml")  # logged, skipped
        True
    """
    names: list[str] = []
    for path in _shipped_config_files():
        names += register_yaml(path, validate=False)
    env = os.environ.get(CONFIGS_ENV, "") if env is None else env
    for entry in filter(None, env.split(os.pathsep)):
        try:
            names += register_yaml(entry, validate=False)
        except AnysizeError as e:  # the user's file: the rest of the package (and the CLI's --help) still works
            _log.warning("$%s: %s (its variants are not registered)", CONFIGS_ENV, one_line(e))
    return names
