"""The one module that imports timm's private modules (``timm.*._*``); everything else imports from here.

timm may rename or move what its underscored modules hold between releases; with one importer, such a change breaks
one line here, in one place, instead of every family that uses it. Import a name here only when timm exports it from
no public module (``timm.models``, ``timm.layers``): ``checkpoint`` and ``checkpoint_seq``, for one, come from
``timm.models``.
"""

from __future__ import annotations

# timm's index selection for forward_intermediates (last n, negative indices, range checks): the contract every
# family's forward_intermediates shares; timm.models exports FeatureInfo and the feature wrappers, not this.
from timm.models._features import feature_take_indices

__all__ = ["feature_take_indices"]
