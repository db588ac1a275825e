"""Recipes: named presets, as data.

A recipe is a YAML file (``recipes/*.yaml`` ship with vitq; a user may pass a path) that says
*which* sites get *what* quantizer - rules keyed by ``kind:ROLE`` - and which passes run, in order.
Loading validates everything: an unknown key, role, quantizer or pass is an error, never ignored.

Rule resolution for a site (kind ``act`` or ``weight``, role R, module name N):
``overrides`` matching N (first match) > ``kind:R`` > ``kind:*``; the wildcard does not reach the
fully-quantized roles (LN_IN, SOFTMAX_IN, RESIDUAL), which a recipe must name - unless it sets
``full_quant: true`` (fully-quantized mode: those sites then follow ``act:*`` too, unless named). A rule
value of ``null`` means "leave this site in float". A rule's ``bits`` is ``W``, ``A`` (taken from the
run's WxAy) or an int. ``softmax`` names the :class:`~vitq.nn.QSoftmax` implementation (``float``, or
``int_exp``: FQ-ViT / I-BERT integer exponent). ``extends`` takes a recipe or a list of recipes,
merged left to right: rules accumulate (later wins per key); any other key of a later base wins
where it is not the default; the recipe's own keys win over all (``extends: [fq, repq]`` = repq,
fully quantized).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from ..bits import Bits
from ..errors import ConfigError
from ..quantizers.base import QuantSpec
from ..roles import FULL_QUANT_ROLES, Role, parse_role

RECIPE_DIR = Path(str(resources.files(__package__)))
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SiteRule:
    """A quantizer spec whose bit-width may be symbolic (``W`` / ``A``)."""

    quantizer: str = "uniform"
    bits: Any = "A"
    symmetric: bool = False
    granularity: str = "tensor"
    observer: str = "minmax"
    percentile: float = 0.9999
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "SiteRule":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed are {sorted(known)}")
        d = dict(d)
        if "options" in d:
            d["options"] = tuple(sorted(dict(d["options"] or {}).items()))
        rule = cls(**d)
        if not (rule.bits in ("W", "A") or isinstance(rule.bits, int)):
            raise ConfigError(f"{where}: bits must be 'W', 'A' or an integer, got {rule.bits!r}")
        rule.resolve(Bits(8, 8))  # validates quantizer / granularity / observer now
        return rule

    def resolve(self, bits: Bits) -> QuantSpec:
        b = bits.w if self.bits == "W" else bits.a if self.bits == "A" else int(self.bits)
        return QuantSpec(quantizer=self.quantizer, bits=b, symmetric=self.symmetric,
                         granularity=self.granularity, observer=self.observer,
                         percentile=self.percentile, options=self.options)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["options"] = dict(self.options)
        return d


@dataclass(frozen=True)
class PassConfig:
    """One step of a recipe: a registered pass name and its (validated) options."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def opt(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.name, **dict(self.options)}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    paper: str = ""
    calib_size: int = 32
    rules: tuple[tuple[str, Optional[SiteRule]], ...] = ()
    overrides: tuple[tuple[str, str, Optional[SiteRule]], ...] = ()  # (kind, regex, rule)
    passes: tuple[PassConfig, ...] = (PassConfig("calibrate"),)
    version: int = FORMAT_VERSION
    full_quant: bool = False  # fully-quantized mode: LN_IN / SOFTMAX_IN / RESIDUAL follow act:*
    softmax: str = "float"  # QSoftmax implementation (vitq.nn.SOFTMAX_IMPLS)

    def rule_for(self, kind: str, role: Role, module_name: str) -> Optional[SiteRule]:
        for k, pattern, rule in self.overrides:
            if k in (kind, "*") and re.search(pattern, module_name):
                return rule
        table = dict(self.rules)
        if f"{kind}:{role.value}" in table:
            return table[f"{kind}:{role.value}"]
        if role in FULL_QUANT_ROLES and not self.full_quant:
            return None  # fully-quantized sites only by name
        return table.get(f"{kind}:*")

    def with_overrides(self, extra: list[tuple[str, str, Optional[SiteRule]]]) -> "Recipe":
        for _, pattern, _ in extra:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"bad module-name pattern {pattern!r} ({e}): use a Python regular expression") from None
        return replace(self, overrides=tuple(extra) + self.overrides)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "vitq.Recipe", "version": self.version, "name": self.name,
            "description": self.description, "paper": self.paper, "calib_size": self.calib_size,
            "rules": {k: (None if r is None else r.to_dict()) for k, r in self.rules},
            "overrides": [{"kind": k, "pattern": p, "rule": None if r is None else r.to_dict()}
                          for k, p, r in self.overrides],
            "passes": [p.to_dict() for p in self.passes],
            "full_quant": self.full_quant, "softmax": self.softmax,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "recipe") -> "Recipe":
        from ..passes.registry import validate_pass

        allowed = {"type", "version", "name", "description", "paper", "calib_size", "rules", "overrides",
                   "passes", "extends", "full_quant", "softmax"}
        unknown = set(d) - allowed
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {sorted(unknown)}; allowed are {sorted(allowed)}")
        base: dict[str, Any] = {}
        ext = d.get("extends")
        defaults = cls(name="").to_dict()
        for i, name in enumerate([] if not ext else ext if isinstance(ext, list) else [ext]):
            b = load_recipe(str(name)).to_dict()
            # a later base overrides an earlier one only where it differs from the defaults, so
            # extends: [fq, repq] is repq in fully-quantized mode
            b = {k: v for k, v in b.items() if i == 0 or k == "name" or v != defaults.get(k)}
            base = {**base, **b, "rules": {**(base.get("rules") or {}), **(b.get("rules") or {})}}
        rules_in = {**(base.get("rules") or {}), **(d.get("rules") or {})}
        rules: list[tuple[str, Optional[SiteRule]]] = []
        for key, val in rules_in.items():
            kind, _, role = str(key).partition(":")
            if kind not in ("act", "weight") or not role:
                raise ConfigError(f"{source}: rule key {key!r} must look like 'act:ROLE', 'weight:ROLE' or 'act:*'")
            if role != "*":
                parse_role(role)
            rules.append((f"{kind}:{role.upper() if role != '*' else '*'}",
                          None if val is None else SiteRule.from_dict(val, f"{source} rule {key}")))
        overrides = []
        for o in d.get("overrides") or base.get("overrides") or []:
            rule = o.get("rule")
            overrides.append((o.get("kind", "*"), o["pattern"],
                              None if rule is None else SiteRule.from_dict(rule, f"{source} override")))
        passes = []
        for p in d.get("passes", base.get("passes", [{"pass": "calibrate"}])):
            p = dict(p)
            name = p.pop("pass", None)
            if not name:
                raise ConfigError(f"{source}: every pass needs a 'pass: NAME' entry")
            validate_pass(name, p, source)
            passes.append(PassConfig(name, tuple(sorted(p.items()))))
        full_quant = d.get("full_quant", base.get("full_quant", False))
        if not isinstance(full_quant, bool):
            raise ConfigError(f"{source}: full_quant must be true or false, got {full_quant!r}")
        softmax = str(d.get("softmax", base.get("softmax", "float")))
        from ..nn import SOFTMAX_IMPLS

        if softmax not in SOFTMAX_IMPLS:
            raise ConfigError(f"{source}: unknown softmax {softmax!r}: use one of {', '.join(sorted(SOFTMAX_IMPLS))}")
        return cls(
            name=str(d.get("name", base.get("name", source))),
            description=str(d.get("description", "")), paper=str(d.get("paper", "")),
            calib_size=int(d.get("calib_size", base.get("calib_size", 32))),
            rules=tuple(rules), overrides=tuple(overrides), passes=tuple(passes),
            version=int(d.get("version", FORMAT_VERSION)), full_quant=full_quant, softmax=softmax,
        )


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: "str | Recipe") -> Recipe:
    """A shipped recipe by name (``minmax``), or a YAML file by path."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"recipe file {p} does not exist: check the path")
        src = str(p)
    else:
        p = RECIPE_DIR / f"{name_or_path}.yaml"
        if not p.is_file():
            raise ConfigError(f"unknown recipe {name_or_path!r}: choose one of {', '.join(list_recipes())} or pass a YAML file")
        src = f"recipe {name_or_path}"
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{src} is not valid YAML ({str(e).splitlines()[0]}): fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{src} must be a YAML mapping")
    data.setdefault("name", p.stem)
    return Recipe.from_dict(data, src)
