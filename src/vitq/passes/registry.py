"""Pass registry: name -> (function, typed options). Recipes name passes; run_recipe calls them.

Every pass declares one frozen options dataclass (a :class:`PassOptions`): the one place its
defaults live. A recipe's options for a pass are turned into that object once, when the recipe is
loaded or edited (``--set``), which checks every key and value; the pass receives the validated
object (``fn(model, ctx, opts)``) and never re-reads a raw mapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import ConfigError
from ..options import Options

#: every pass's options class derives from this (frozen dataclass; see :mod:`vitq.options`)
PassOptions = Options


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: Callable[..., Any]
    options_type: type[PassOptions]
    doc: str

    @property
    def options(self) -> dict[str, Any]:
        """option -> default."""
        return self.options_type.defaults()


PASSES: dict[str, PassInfo] = {}


def register_pass(name: str, options: type[PassOptions]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(model, ctx, opts)`` under ``name`` with its options dataclass."""
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        options.pass_name = name
        PASSES[name] = PassInfo(name, fn, options, (fn.__doc__ or "").strip().splitlines()[0])
        return fn
    return deco


def parse_options(name: str, options: Mapping[str, Any], source: str = "recipe") -> PassOptions:
    """The validated options object of pass ``name``; any problem is a one-line ConfigError naming
    ``source`` and the pass."""
    info = get_pass(name, source)
    try:
        return info.options_type.parse(options)
    except ConfigError as e:
        raise ConfigError(f"{source}: pass {name!r}: {e}") from None


def all_passes() -> dict[str, PassInfo]:
    """Every registered pass by name."""
    return dict(PASSES)


def get_pass(name: str, source: str = "") -> PassInfo:
    if name not in PASSES:
        prefix = f"{source}: " if source else ""
        raise ConfigError(f"{prefix}unknown pass {name!r}; available: {', '.join(sorted(PASSES))}")
    return PASSES[name]


__all__ = ["PASSES", "PassInfo", "PassOptions", "all_passes", "get_pass", "parse_options", "register_pass"]
