"""transformers checkpoints (layouts added below)."""

LAYOUTS: tuple = ()
