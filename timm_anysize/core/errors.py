"""Error types. All subclass built-in exceptions so callers can catch them naturally."""

from __future__ import annotations

__all__ = [
    "AnysizeError",
    "SpecError",
    "WeightsError",
    "AdaptationError",
    "RegistrationError",
    "UnsupportedModelError",
    "CalibrationError",
    "InputSizeError",
    "InputNotDivisibleError",
    "one_line",
]


class AnysizeError(ValueError):
    """Base class of every error timm-anysize raises on bad input."""


class SpecError(AnysizeError):
    """A variant spec (YAML or dict) is invalid.

    The message names the file, the variant and the key path, e.g.
    ``configs/x.yaml: vit_tiny_patch4_64.patch_size: must divide img_size 64, got 5``.
    """


class RegistrationError(AnysizeError):
    """A variant cannot be registered under its name (collision with timm or another spec)."""


class WeightsError(AnysizeError):
    """A weight file or Hub repo cannot be read, or holds something other than what the spec expects."""


class AdaptationError(AnysizeError):
    """Source weights cannot be mapped onto the target model with every tensor accounted for."""


class UnsupportedModelError(AnysizeError, TypeError):
    """A model that a run-time feature (any input size, a run-time patch size) does not support: a ``TypeError``
    too, as for any argument of the wrong kind."""


class CalibrationError(AnysizeError):
    """Calibration cannot run: the model is not a variant, or the images are empty or unreadable."""


class InputSizeError(AnysizeError):
    """A run-time input size the model cannot run at: smaller than its smallest input (its stem and stride chain),
    not a multiple of what it needs (:class:`InputNotDivisibleError`), or, for a variant built with
    ``dynamic: false``, any size but its own. Raised before any layer runs, through
    :func:`timm_anysize.core.padding.check_input_size`, whose message names the input size, the minimum or the
    multiple and the nearest sizes that work. A ``ValueError``, so ``except ValueError`` catches it.

    Attributes:
        size: The input's (H, W).
        minimum: The smallest (H, W) the model runs at.
        multiple: What each side must be a multiple of ((1, 1): anything).
        nearest: The nearest sizes (H, W) that work.
    """

    def __init__(
        self,
        message: str,
        size: tuple[int, int] = (0, 0),
        minimum: tuple[int, int] = (1, 1),
        multiple: tuple[int, int] = (1, 1),
        nearest: tuple[tuple[int, int], ...] = (),
    ) -> None:
        super().__init__(message)
        self.size = size
        self.minimum = minimum
        self.multiple = multiple
        self.nearest = nearest


class InputNotDivisibleError(InputSizeError):
    """A run-time input size is not a multiple of what the model needs (its patch, windows, mask units) and padding
    is off. An :class:`InputSizeError` (a ``ValueError``, so ``except ValueError`` catches it); raised through
    :func:`timm_anysize.core.padding.check_multiple`, whose message names the size, the multiple and the nearest sizes
    that work.

    Attributes:
        size: The input's (H, W).
        multiple: What each side must be a multiple of.
    """


def one_line(error: BaseException) -> str:
    """An error's message as one line: the lines of a message that lists several problems (a YAML file with two bad
    variants), or of a library's multi-line message (a YAML syntax error), joined with ``"; "``.

    Example:
        >>> one_line(SpecError("a.yaml: x.img_size: must be positive\\nb.yaml: y: unknown base"))
        'a.yaml: x.img_size: must be positive; b.yaml: y: unknown base'
        >>> one_line(KeyError("'nope' is not a timm-anysize variant"))
        "'nope' is not a timm-anysize variant"
    """
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip()) or type(error).__name__
