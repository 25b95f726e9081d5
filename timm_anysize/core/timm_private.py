"""The one module that imports timm's private modules (``timm.*._*``); everything else imports from here.

timm may rename or move what its underscored modules hold between releases; with one importer, such a change breaks
one line here, in one place, instead of every family that uses it. Import a name here only when timm exports it from
no public module (``timm.models``, ``timm.layers``): ``checkpoint`` and ``checkpoint_seq``, for one, come from
``timm.models``.
"""

from __future__ import annotations

# timm's index selection for forward_intermediates (last n, negative indices, range checks): the contract every
# family's forward_intermediates shares; timm.models exports FeatureInfo and the feature wrappers, not this.
from timm.models import _registry as _timm_registry
from timm.models._features import feature_take_indices

__all__ = ["feature_take_indices", "unregister_model"]


def unregister_model(name: str) -> None:
    """Remove a model from timm's registry: its entrypoint, module, tags and pretrained cfgs (``timm.list_models``,
    ``timm.is_model`` and ``timm.create_model`` no longer know it). timm has ``register_model`` but no public inverse;
    ``_clear_model_entries`` is what its ``register_model`` calls to drop a registration it overwrites.
    """
    _timm_registry._clear_model_entries(name)
    _timm_registry._model_entrypoints.pop(name, None)
