"""The package version (in the core, so that every layer can name it in user agents and cards)."""

__version__ = "0.1.0"
