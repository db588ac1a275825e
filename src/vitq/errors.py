"""User-facing errors.

Every problem a user can cause (bad path, bad model, bad bit-width, empty calibration set, NaN
activations, ...) is raised as a :class:`VitqError` whose message is one line naming the problem
and the fix. The CLI prints that line and exits with code 2; it never shows a traceback for these.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any


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


def check_field_types(cfg: Any, where: str = "") -> None:
    """One-line ConfigError for the first field of dataclass ``cfg`` whose value does not have its
    default's type: true/false for a bool default, a number for an int/float one, a string for a
    string one, a string or null for a None one (a path). A value from a recipe YAML or ``--set``
    that parsed as the wrong type is named here instead of failing later inside a ``float()``. A field
    with ``metadata={"any_type": True}`` is skipped (it takes several types and is checked by its owner)."""
    prefix = f"{where}: " if where else ""
    for f in fields(cfg):
        if f.metadata.get("any_type"):  # takes several types: the dataclass checks it itself
            continue
        d, v = f.default, getattr(cfg, f.name)
        if isinstance(d, bool):
            ok, want = isinstance(v, bool), "true or false"
        elif isinstance(d, (int, float)):
            ok, want = isinstance(v, (int, float)) and not isinstance(v, bool), "a number"
        elif isinstance(d, str):
            ok, want = isinstance(v, str), "a string"
        elif d is None:
            ok, want = v is None or isinstance(v, str), "a path or null"
        else:
            continue
        if not ok:
            raise ConfigError(f"{prefix}{f.name}={v!r} must be {want}")
