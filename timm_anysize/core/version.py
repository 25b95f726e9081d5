"""The package version (in the core, so that every layer can name it in user agents and cards).

pyproject.toml's ``version`` is the one place it is written; this reads it from the installed package's metadata.
"""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("timm-anysize")
except PackageNotFoundError:  # a source tree on sys.path that was never installed: no metadata to read
    __version__ = "0+unknown"
