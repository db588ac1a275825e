"""Pass registry: name -> (function, allowed options). Recipes name passes; run_recipe calls them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from ..errors import ConfigError


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: Callable[..., Any]
    options: Mapping[str, Any]  # option -> default
    doc: str
    #: validates a recipe's (partial) options before anything runs; raises a one-line ConfigError
    check: Optional[Callable[[Mapping[str, Any]], None]] = None


PASSES: dict[str, PassInfo] = {}


def register_pass(name: str, *, check: Optional[Callable[[Mapping[str, Any]], None]] = None,
                  **defaults: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        PASSES[name] = PassInfo(name, fn, dict(defaults), (fn.__doc__ or "").strip().splitlines()[0], check)
        return fn
    return deco


def validate_pass(name: str, options: Mapping[str, Any], source: str = "recipe") -> None:
    """Unknown pass or option, or (where the pass registered a ``check``) a bad value: one-line ConfigError."""
    _ensure_loaded()
    if name not in PASSES:
        raise ConfigError(f"{source}: unknown pass {name!r}; available: {', '.join(sorted(PASSES))}")
    unknown = set(options) - set(PASSES[name].options)
    if unknown:
        raise ConfigError(f"{source}: pass {name!r} has no option(s) {sorted(unknown)}; "
                          f"allowed are {sorted(PASSES[name].options)}")
    if PASSES[name].check is not None:
        try:
            PASSES[name].check(options)
        except ConfigError as e:
            raise ConfigError(f"{source}: pass {name!r}: {e}") from None
        except (TypeError, ValueError) as e:  # e.g. a list where a name belongs
            raise ConfigError(f"{source}: pass {name!r}: bad option value ({e}); see `vitq list` for the defaults") from None


def parse_assignments(items: Sequence[str], flag: str = "--set") -> dict[str, Any]:
    """``["loss=fisher_diag", "iters=500", "candidates=[half, block]"]`` -> ``{"loss": "fisher_diag", ...}``.

    A value is an int, a float (``4e-5`` too) or YAML (``true``, ``null``, ``[a, b]``, a string)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: write OPTION=VALUE, e.g. {flag} loss=fisher_diag")
        out[key] = _scalar(text.strip())
    return out


def _scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    import yaml

    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text


def _homeless_hint(keys: Sequence[str], names: Sequence[str]) -> str:
    """Why a recipe whose passes are ``names`` cannot take option(s) ``keys``, and which recipes can."""
    from ..recipes import list_recipes, load_recipe

    owners = sorted({n for n, info in PASSES.items() if set(keys) <= set(info.options)})
    if not owners:
        takes = sorted({o for n in names for o in get_pass(n).options})
        return f"its passes ({', '.join(dict.fromkeys(names))}) take {', '.join(takes)}"
    runs = [r for r in list_recipes() if {pc.name for pc in load_recipe(r).passes} & set(owners)]
    return (f"{'it is an option' if len(keys) == 1 else 'they are options'} of the {' or '.join(owners)} pass, "
            f"which this recipe does not run: use a recipe that does ({', '.join(runs)}) or drop the option")


def set_pass_options(recipe: Any, values: Mapping[str, Any]) -> Any:
    """A copy of ``recipe`` where every pass that has option ``k`` gets ``values[k]`` (``None`` included:
    it is a value, e.g. ``clip_mad_k: null``). Every key must be an option of at least one of the recipe's
    passes, and the changed passes are validated again, so a typo or a bad value fails here, before
    calibration. The CLI's ``--set`` uses this."""
    from dataclasses import replace

    from ..recipes import PassConfig

    if not values:
        return recipe
    names = [pc.name for pc in recipe.passes]
    homeless = sorted(k for k in values if not any(k in get_pass(n).options for n in names))
    if homeless:
        raise ConfigError(f"recipe {recipe.name} has no pass with option(s) {', '.join(homeless)}: "
                          + _homeless_hint(homeless, names))
    passes = []
    for pc in recipe.passes:
        new = dict(pc.options)
        mine = {k: v for k, v in values.items() if k in get_pass(pc.name).options}
        if mine:
            new.update(mine)
            validate_pass(pc.name, new, f"recipe {recipe.name}")
        passes.append(PassConfig(pc.name, tuple(sorted(new.items()))))
    return replace(recipe, passes=tuple(passes))


def override_pass_options(recipe: Any, **opts: Any) -> Any:
    """:func:`set_pass_options` for optional settings: ``None`` means "not given" and is skipped (the
    CLI's ``--iters`` / ``--max-cache-gb`` / ``--resume-dir``, the benches' variants)."""
    return set_pass_options(recipe, {k: v for k, v in opts.items() if v is not None})


def all_passes() -> dict[str, PassInfo]:
    """Every registered pass by name."""
    _ensure_loaded()
    return dict(PASSES)


def get_pass(name: str) -> PassInfo:
    _ensure_loaded()
    if name not in PASSES:
        raise ConfigError(f"unknown pass {name!r}; available: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def _ensure_loaded() -> None:
    # registration: each module registers its passes (calibrate; tanq_calibrate; ptq4vit_search;
    # reparam; reconstruct; oas; aocq_balance and aocq_act_scales)
    from . import calibrate, oas, outlier, ptq4vit, reconstruct, repq, scale_search, tanq_calib  # noqa: F401
