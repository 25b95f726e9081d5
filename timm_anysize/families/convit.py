"""TNT (Transformer in Transformer)."""

FAMILIES = ()
