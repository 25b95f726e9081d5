"""mmpretrain checkpoints (layouts added below)."""

LAYOUTS: tuple = ()
