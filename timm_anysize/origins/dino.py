"""dino checkpoints (layouts added below)."""

LAYOUTS: tuple = ()
