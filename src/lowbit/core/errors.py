"""Error types. Every message says what went wrong and how to fix it."""

from __future__ import annotations


class LowbitError(Exception):
    """Base class of every error lowbit raises on bad user input; the CLI prints it and exits 2."""


class SchemeError(LowbitError, ValueError):
    """A quantization scheme or option that cannot be built or applied."""


class ModelLoadError(LowbitError):
    """A model that cannot be found, read or converted."""


class UnsupportedArchitectureError(LowbitError):
    """A model whose architecture has no entry in the architecture tables."""


class DataError(LowbitError):
    """Calibration or evaluation data that is missing, corrupt or empty."""


class FormatError(LowbitError):
    """An artifact on disk that does not follow its format."""


class RecipeError(LowbitError, ValueError):
    """A recipe that cannot be read or does not validate; the message names the key's path."""
