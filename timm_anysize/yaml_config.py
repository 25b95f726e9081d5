"""Reading variant YAML files into specs (safe YAML only: no Python tags, duplicate keys are errors)."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Union

import yaml

from timm_anysize.core.errors import SpecError
from timm_anysize.core.spec import VariantSpec, parse_variant

__all__ = ["load_yaml_specs"]

TOP_LEVEL_KEYS = ("variants",)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # keys merged in from an anchor (<<: *x) may be overridden; only explicit keys must be unique
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (each key may appear once)", key_node.start_mark
            )
        seen.add(key)
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml_specs(path: Union[str, os.PathLike]) -> list[VariantSpec]:
    """Parse every variant of a YAML file. Nothing is registered.

    Args:
        path: A YAML file with a top-level ``variants:`` mapping of name -> spec.

    Returns:
        The validated specs, in file order.

    Raises:
        SpecError: The file is missing, not valid YAML, or any variant is invalid; every invalid variant is listed.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "v.yaml"
        >>> _ = p.write_text("variants:\\n  my_vit:\\n    base: vit_tiny_patch16_224\\n    img_size: 64\\n")
        >>> [s.name for s in load_yaml_specs(p)]
        ['my_vit']
    """
    origin = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{origin}: no such file (resolved to {Path(path).resolve()})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{origin}: cannot read the file: {e}") from e
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise SpecError(f"{origin}: not valid YAML: {e}") from None
    if doc is None:
        return []
    if not isinstance(doc, dict):
        raise SpecError(f"{origin}: the top level must be a mapping with a 'variants:' key, got {type(doc).__name__}")
    unknown = [k for k in doc if k not in TOP_LEVEL_KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), TOP_LEVEL_KEYS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SpecError(f"{origin}: unknown top-level key {unknown[0]!r}{hint} (allowed: {', '.join(TOP_LEVEL_KEYS)})")
    variants = doc.get("variants") or {}
    if not isinstance(variants, dict):
        raise SpecError(f"{origin}: variants: must map variant names to specs, got {type(variants).__name__}")
    specs, errors = [], []
    for name, data in variants.items():
        try:
            specs.append(parse_variant(name, data, origin))
        except SpecError as e:
            errors.append(str(e))
    if errors:
        raise SpecError("\n".join(errors))
    return specs
