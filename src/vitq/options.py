"""Typed options: the base of every pass's (and the reconstruction engine's) options dataclass.

An options class is a frozen dataclass whose field defaults are *the* defaults (the one place they
live). Building one checks every value once - types by :func:`~vitq.errors.check_field_types`,
values by :meth:`Options.validate` - so a pass receives an object it can trust.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any, ClassVar, Mapping, TypeVar

from .errors import ConfigError, check_field_types

OptionsT = TypeVar("OptionsT", bound="Options")


class Options:
    """Mixin for ``@dataclass(frozen=True)`` option classes (see the module docstring)."""

    #: the pass these options belong to (set when the pass is registered), for messages
    pass_name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_field_types(self)
        self.validate()

    def validate(self) -> None:
        """Raise a one-line :class:`~vitq.errors.ConfigError` for a value that cannot be used."""

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        out = {}
        for f in fields(cls):  # type: ignore[arg-type]
            out[f.name] = f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default
        return out

    @classmethod
    def parse(cls: type[OptionsT], values: Mapping[str, Any]) -> OptionsT:
        """The options object for a (partial) mapping of values: unknown keys and bad values are errors."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"has no option(s) {sorted(unknown)}; allowed are {sorted(known)}")
        try:
            return cls(**dict(values))
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:  # a list where a number belongs, float("x"), ...
            raise ConfigError(f"bad option value ({e}); see `vitq list` for the defaults") from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    def changed(self) -> dict[str, Any]:
        """The options whose values differ from the defaults."""
        d = self.defaults()
        return {k: v for k, v in self.to_dict().items() if v != d[k]}

    def replace(self: OptionsT, **kw: Any) -> OptionsT:
        """A copy with ``kw`` changed, validated again."""
        return type(self).parse({**self.to_dict(), **kw})


def need(ok: bool, msg: str) -> None:
    """``ConfigError(msg)`` unless ``ok``: the one-liner validators use."""
    if not ok:
        raise ConfigError(msg)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


__all__ = ["Options", "is_int", "is_number", "need"]
