"""The module timm sees as the home of every registered variant (``timm.list_models(module='variants')``).

timm's ``register_model`` reads ``default_cfgs`` and ``__all__`` from an entrypoint's module; registration in
:mod:`timm_anysize.registry` adds one entrypoint function and one default cfg here per variant.
"""

from __future__ import annotations

from typing import Any

__all__: list[str] = []
default_cfgs: dict[str, Any] = {}
