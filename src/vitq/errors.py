"""User-facing errors.

Every problem a user can cause (bad path, bad model, bad bit-width, empty calibration set, NaN
activations, ...) is raised as a :class:`VitqError` whose message is one line naming the problem
and the fix. The CLI prints that line and exits with code 2; it never shows a traceback for these.
"""

from __future__ import annotations


class VitqError(Exception):
    """Base class of every error caused by user input. ``str(err)`` is a complete one-line message."""

    exit_code = 2


class ConfigError(VitqError, ValueError):
    """A recipe, quantizer spec or bit-width that cannot be used."""


class ModelError(VitqError):
    """A model or checkpoint that cannot be loaded or is not supported."""


class DataError(VitqError):
    """A dataset that cannot be read, or a calibration/evaluation size that does not fit it."""


class CalibrationError(VitqError):
    """Calibration met values it cannot quantize (NaN/Inf) or had no data."""
