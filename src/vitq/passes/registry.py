"""Pass registry: name -> (function, allowed options). Recipes name passes; run_recipe calls them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import ConfigError


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: Callable[..., Any]
    options: Mapping[str, Any]  # option -> default
    doc: str


PASSES: dict[str, PassInfo] = {}


def register_pass(name: str, **defaults: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        PASSES[name] = PassInfo(name, fn, dict(defaults), (fn.__doc__ or "").strip().splitlines()[0])
        return fn
    return deco


def validate_pass(name: str, options: Mapping[str, Any], source: str = "recipe") -> None:
    _ensure_loaded()
    if name not in PASSES:
        raise ConfigError(f"{source}: unknown pass {name!r}; available: {', '.join(sorted(PASSES))}")
    unknown = set(options) - set(PASSES[name].options)
    if unknown:
        raise ConfigError(f"{source}: pass {name!r} has no option(s) {sorted(unknown)}; "
                          f"allowed are {sorted(PASSES[name].options)}")


def get_pass(name: str) -> PassInfo:
    _ensure_loaded()
    if name not in PASSES:
        raise ConfigError(f"unknown pass {name!r}; available: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def _ensure_loaded() -> None:
    from . import calibrate  # noqa: F401  (registration)
    from . import tanq_calib  # noqa: F401  (registration: tanq_calibrate)
    from . import ptq4vit, repq  # noqa: F401  (registration: ptq4vit_search, reparam)
    from . import oas, reconstruct  # noqa: F401  (registration: reconstruct, oas)
    from . import outlier, scale_search  # noqa: F401  (registration: aocq_balance, aocq_act_scales)
