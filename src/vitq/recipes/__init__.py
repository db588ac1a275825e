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
``int_exp``: FQ-ViT / I-BERT integer exponent). ``when`` adds rules that hold only at some activation
or weight widths - ``when: {"A<=3": {rules: {...}}}`` (conditions ``A<=n``, ``A>=n``, ``A==n``, and ``W<=n``,
``W>=n``, ``W==n`` on the weight bits) - because the best
quantizer for a site can change with its width (post-GELU / post-Softmax at 3 bits, ``best``); they win over
``rules`` where they apply. A ``when`` block may also give ``passes``, which replace the recipe's passes at
those widths (``best`` reconstructs only below 6-bit activations), and ``calib_size``. :meth:`Recipe.at` folds the blocks in
once the run's bits are known (the pipeline does, before any quantizer exists). ``extends`` takes a recipe or a list of recipes,
merged left to right: rules accumulate (later wins per key); any other key of a later base wins
where it is not the default; the recipe's own keys win over all (``extends: [fq, repq]`` = repq,
fully quantized).

Recipes sit above the passes: this package validates each pass's options into the pass's own
options object (:func:`vitq.passes.parse_options`) when a recipe is loaded or edited, and the
editing helpers (``set_pass_options`` for ``--set``, ``override_pass_options``) live here too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from ..bits import MAX_BITS, MIN_BITS, Bits, check_width
from ..defaults import DEFAULT_RECIPE, FAST_RECIPE
from ..errors import ConfigError
from ..granularity import parse_granularity
from ..nn import SOFTMAX_IMPLS
from ..passes import PASSES, PassOptions, get_pass, parse_options
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
            if d["options"] is not None and not isinstance(d["options"], Mapping):
                raise ConfigError(f"{where}: options must be a mapping of option names to values, got {d['options']!r}")
            d["options"] = tuple(sorted(dict(d["options"] or {}).items()))
        rule = cls(**d)
        if not isinstance(rule.symmetric, bool):  # YAML's 'yes' in quotes is a string, and truthy
            raise ConfigError(f"{where}: symmetric must be true or false, got {rule.symmetric!r}")
        for key in ("quantizer", "granularity", "observer"):
            if not isinstance(getattr(rule, key), str):
                raise ConfigError(f"{where}: {key} must be a name, got {getattr(rule, key)!r}")
        if isinstance(rule.percentile, bool) or not isinstance(rule.percentile, (int, float)):
            raise ConfigError(f"{where}: percentile must be a number, got {rule.percentile!r}")
        if isinstance(rule.bits, bool) or not (rule.bits in ("W", "A") or isinstance(rule.bits, int)):
            raise ConfigError(f"{where}: bits must be 'W', 'A' or an integer, got {rule.bits!r}")
        if rule.bits not in ("W", "A"):
            try:
                check_width(rule.bits)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        try:
            rule.resolve(Bits(8, 8))  # validates quantizer / granularity / observer now
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        return rule

    def resolve(self, bits: Bits) -> QuantSpec:
        b = bits.w if self.bits == "W" else bits.a if self.bits == "A" else int(self.bits)
        return QuantSpec(quantizer=self.quantizer, bits=b, symmetric=self.symmetric,
                         granularity=parse_granularity(self.granularity), observer=self.observer,
                         percentile=self.percentile, options=self.options)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["options"] = dict(self.options)
        return d


@dataclass(frozen=True)
class PassConfig:
    """One step of a recipe: a registered pass name, the options the recipe gives it (``options``,
    what a recipe file holds) and the validated options object the pass receives (``opts``: every
    option, defaults filled in; built here when not given)."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()
    opts: PassOptions = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.opts is None:
            object.__setattr__(self, "opts", parse_options(self.name, dict(self.options), f"pass {self.name!r}"))

    @classmethod
    def make(cls, name: str, options: Mapping[str, Any], source: str = "recipe") -> "PassConfig":
        """Validate ``options`` for pass ``name`` (a one-line error naming ``source``) and build the step."""
        return cls(name, tuple(sorted(options.items())), parse_options(name, options, source))

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
    when: tuple["When", ...] = ()  # width-conditional rules / passes, in the order written

    def at(self, bits: "Bits | str") -> "Recipe":
        """The recipe for a run at ``bits``: the ``when`` rules whose condition holds merged over ``rules``
        (in the order written), the conditions dropped. A recipe without ``when`` is returned as it is."""
        if not self.when:
            return self
        b = Bits.parse(bits)
        rules, passes, calib = dict(self.rules), self.passes, self.calib_size
        by: dict[str, str] = {}  # what a holding block set -> its condition: two that disagree are an error

        def claim(what: str, cond: str, same: bool) -> None:
            if what in by and not same:
                raise ConfigError(f"recipe {self.name}: when blocks {by[what]!r} and {cond!r} both hold at {b} and give "
                                  f"different {what}: make the conditions exclusive, or give it in one block")
            by[what] = cond

        for w in self.when:
            if _holds(w.condition, b):
                for key, rule in w.rules:
                    claim(f"rule {key}", w.condition, rules.get(key) == rule)
                    rules[key] = rule
                if w.passes is not None:
                    claim("passes", w.condition, passes == w.passes)
                    passes = w.passes
                if w.calib_size is not None:
                    claim("calib_size", w.condition, calib == w.calib_size)
                    calib = w.calib_size
        return replace(self, rules=tuple(rules.items()), passes=passes, calib_size=calib, when=())

    def with_calib_size(self, n: int) -> "Recipe":
        """The recipe calibrating on ``n`` images at every width (``--calib-size``: over the ``when`` blocks' sizes)."""
        return replace(self, calib_size=int(n), when=tuple(replace(w, calib_size=None) for w in self.when))

    def all_passes(self) -> list[PassConfig]:
        """Every pass the recipe can run, at any width (its own and its ``when`` blocks')."""
        return [*self.passes, *(pc for w in self.when for pc in (w.passes or ()))]

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
            **({"when": {w.condition: w.to_dict() for w in self.when}} if self.when else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "recipe") -> "Recipe":
        allowed = {"type", "version", "name", "description", "paper", "calib_size", "rules", "overrides",
                   "passes", "extends", "full_quant", "softmax", "when"}
        unknown = set(d) - allowed
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {sorted(unknown)}; allowed are {sorted(allowed)}")
        _check_shapes(d, source)
        base: dict[str, Any] = {}
        ext = d.get("extends")
        defaults = cls(name="").to_dict()
        for i, name in enumerate([] if not ext else ext if isinstance(ext, list) else [ext]):
            b = load_recipe(str(name)).to_dict()
            # a later base overrides an earlier one only where it differs from the defaults, so
            # extends: [fq, repq] is repq in fully-quantized mode
            b = {k: v for k, v in b.items() if i == 0 or k == "name" or v != defaults.get(k)}
            base = {**base, **b, "rules": {**(base.get("rules") or {}), **(b.get("rules") or {})},
                    "when": _merge_when(base.get("when"), b.get("when"))}
        rules_in = {**(base.get("rules") or {}), **(d.get("rules") or {})}
        rules = _parse_rules(rules_in, source)
        when = []
        for cond, block in _merge_when(base.get("when"), d.get("when")).items():
            _condition(cond, source)
            where = f"{source} when {cond!r}"
            ps = block.get("passes")
            when.append(When(cond, tuple(_parse_rules(block.get("rules") or {}, where)),
                             None if ps is None else tuple(_parse_passes(ps, where)), block.get("calib_size")))
        overrides = []
        for o in d.get("overrides") or base.get("overrides") or []:
            rule = o.get("rule")
            overrides.append((o.get("kind", "*"), o["pattern"],
                              None if rule is None else SiteRule.from_dict(rule, f"{source} override")))
        passes = _parse_passes(d.get("passes", base.get("passes", [{"pass": "calibrate"}])), source)
        full_quant = d.get("full_quant", base.get("full_quant", False))
        if not isinstance(full_quant, bool):
            raise ConfigError(f"{source}: full_quant must be true or false, got {full_quant!r}")
        softmax = str(d.get("softmax", base.get("softmax", "float")))
        if softmax not in SOFTMAX_IMPLS:
            raise ConfigError(f"{source}: unknown softmax {softmax!r}: use one of {', '.join(sorted(SOFTMAX_IMPLS))}")
        return cls(
            name=str(d.get("name", base.get("name", source))),
            description=str(d.get("description", "")), paper=str(d.get("paper", "")),
            calib_size=int(d.get("calib_size", base.get("calib_size", 32))),
            rules=tuple(rules), overrides=tuple(overrides), passes=tuple(passes),
            version=int(d.get("version", FORMAT_VERSION)), full_quant=full_quant, softmax=softmax,
            when=tuple(when),
        )


@dataclass(frozen=True)
class When:
    """A ``when`` block: rules (and optionally the passes) of a recipe at the activation widths ``condition``
    names."""

    condition: str
    rules: tuple[tuple[str, Optional[SiteRule]], ...] = ()
    passes: Optional[tuple[PassConfig, ...]] = None
    calib_size: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rules": {k: (None if r is None else r.to_dict()) for k, r in self.rules}}
        if self.passes is not None:
            d["passes"] = [p.to_dict() for p in self.passes]
        if self.calib_size is not None:
            d["calib_size"] = self.calib_size
        return d


def _parse_passes(items: Sequence[Any], source: str) -> list[PassConfig]:
    passes = []
    for p in items:
        p = dict(p)
        name = p.pop("pass", None)
        if not name:
            raise ConfigError(f"{source}: every pass needs a 'pass: NAME' entry")
        passes.append(PassConfig.make(name, p, source))
    return passes


def _parse_rules(rules_in: Mapping[str, Any], source: str) -> list[tuple[str, Optional[SiteRule]]]:
    rules: list[tuple[str, Optional[SiteRule]]] = []
    for key, val in rules_in.items():
        kind, _, role = str(key).partition(":")
        if kind not in ("act", "weight") or not role:
            raise ConfigError(f"{source}: rule key {key!r} must look like 'act:ROLE', 'weight:ROLE' or 'act:*'")
        if role != "*":
            parse_role(role)
        if not (val is None or isinstance(val, Mapping)):
            raise ConfigError(f"{source}: rule {key!r} must be a mapping (quantizer: ..., bits: ...) or null, got {val!r}")
        rules.append((f"{kind}:{role.upper() if role != '*' else '*'}",
                      None if val is None else SiteRule.from_dict(val, f"{source} rule {key}")))
    return rules


_CONDITION = re.compile(r"^([AW])(<=|>=|==)(\d+)$")


def _condition(cond: Any, source: str) -> tuple[str, str, int]:
    """``(A or W, operator, n)`` of a ``when`` condition."""
    m = _CONDITION.match(str(cond).replace(" ", ""))
    if not m:
        raise ConfigError(f"{source}: when condition {cond!r} is not understood: use A<=n, A>=n, A==n (the run's "
                          f"activation bits) or W<=n, W>=n, W==n (its weight bits), n in {MIN_BITS}..{MAX_BITS}")
    try:
        n = check_width(int(m.group(3)), f"when condition {cond!r}:")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return m.group(1), m.group(2), n


def _holds(cond: str, bits: Bits) -> bool:
    which, op, n = _condition(cond, "recipe")
    v = bits.a if which == "A" else bits.w
    return {"<=": v <= n, ">=": v >= n, "==": v == n}[op]


def _merge_when(base: Any, mine: Any) -> dict[str, Any]:
    """``when`` blocks merged by condition (a later recipe's rule wins per rule key, its passes replace)."""
    out: dict[str, Any] = {}
    for src in (base or {}, mine or {}):
        for cond, block in src.items():
            key = str(cond).replace(" ", "")
            merged = dict(out.get(key) or {})
            merged["rules"] = {**(merged.get("rules") or {}), **(block.get("rules") or {})}
            for k in ("passes", "calib_size"):
                if block.get(k) is not None:
                    merged[k] = block[k]
            out[key] = merged
    return out


def _check_shapes(d: Mapping[str, Any], source: str) -> None:
    """The types of a recipe file's top-level keys, one line naming the key (before anything reads them)."""
    def bad(key: str, want: str) -> ConfigError:
        return ConfigError(f"{source}: {key} must be {want}, got {d[key]!r}")

    if "calib_size" in d and (isinstance(d["calib_size"], bool) or not isinstance(d["calib_size"], int)
                              or d["calib_size"] < 1):
        raise bad("calib_size", "a whole number of images >= 1")
    if "rules" in d and d["rules"] is not None and not isinstance(d["rules"], Mapping):
        raise bad("rules", "a mapping of 'act:ROLE' / 'weight:ROLE' to a quantizer rule")
    if "passes" in d and not (isinstance(d["passes"], list) and all(isinstance(x, Mapping) for x in d["passes"])):
        raise bad("passes", "a list of '- pass: NAME' entries")
    if "overrides" in d and d["overrides"] is not None and not (
            isinstance(d["overrides"], list)
            and all(isinstance(x, Mapping) and isinstance(x.get("pattern"), str) for x in d["overrides"])):
        raise bad("overrides", "a list of {pattern: REGEX, kind: act|weight|*, rule: ...} entries")
    ext = d.get("extends")
    if ext is not None and not (isinstance(ext, str) or (isinstance(ext, list) and all(isinstance(x, str) for x in ext))):
        raise bad("extends", "a recipe name or path, or a list of them")
    for key in ("name", "description", "paper", "softmax"):
        if key in d and d[key] is not None and not isinstance(d[key], str):
            raise bad(key, "a string")
    if "when" in d and d["when"] is not None:
        w = d["when"]
        if not (isinstance(w, Mapping) and all(
                isinstance(v, Mapping) and set(v) <= {"rules", "passes", "calib_size"}
                and isinstance(v.get("rules") or {}, Mapping)
                and (v.get("passes") is None or (isinstance(v["passes"], list)
                                                 and all(isinstance(x, Mapping) for x in v["passes"])))
                and (v.get("calib_size") is None or (type(v["calib_size"]) is int and v["calib_size"] >= 1))
                for v in w.values())):
            raise bad("when", "a mapping of a condition (A<=3, A>=6, A==4) to {rules: {...}, passes: [...], "
                              "calib_size: N}")
    if "rules" in d and isinstance(d["rules"], Mapping):
        for k, v in d["rules"].items():
            if v is not None and not isinstance(v, Mapping):
                raise ConfigError(f"{source}: rule {k!r} must be a mapping (quantizer: ..., bits: ...) or null, got {v!r}")


_LOADING: list[str] = []  # recipes being loaded (extends chains), to refuse a cycle


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
    key = str(p.resolve())
    if key in _LOADING:
        chain = [Path(x).stem for x in _LOADING[_LOADING.index(key):]] + [p.stem]
        raise ConfigError(f"{src}: extends forms a cycle ({' -> '.join(chain)}): remove the loop")
    _LOADING.append(key)
    try:
        return Recipe.from_dict(data, src)
    finally:
        _LOADING.pop()


# -- editing: --set and the flags that change pass options --------------------------------------------
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
    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text


def _homeless_hint(keys: Sequence[str], names: Sequence[str]) -> str:
    """Why a recipe whose passes are ``names`` cannot take option(s) ``keys``, and which recipes can."""
    owners = sorted({n for n, info in PASSES.items() if set(keys) <= set(info.options)})
    if not owners:
        takes = sorted({o for n in names for o in get_pass(n).options})
        return f"its passes ({', '.join(dict.fromkeys(names))}) take {', '.join(takes)}"
    runs = [r for r in list_recipes() if {pc.name for pc in load_recipe(r).passes} & set(owners)]
    return (f"{'it is an option' if len(keys) == 1 else 'they are options'} of the {' or '.join(owners)} pass, "
            f"which this recipe does not run: use a recipe that does ({', '.join(runs)}) or drop the option")


def set_pass_options(recipe: Recipe, values: Mapping[str, Any]) -> Recipe:
    """A copy of ``recipe`` where every pass that has option ``k`` gets ``values[k]`` (``None`` included:
    it is a value, e.g. ``clip_mad_k: null``). Every key must be an option of at least one of the recipe's
    passes, and the changed passes are validated again, so a typo or a bad value fails here, before
    calibration. The CLI's ``--set`` uses this."""
    if not values:
        return recipe
    names = [pc.name for pc in recipe.all_passes()]
    homeless = sorted(k for k in values if not any(k in get_pass(n).options for n in names))
    if homeless:
        raise ConfigError(f"recipe {recipe.name} has no pass with option(s) {', '.join(homeless)}: "
                          + _homeless_hint(homeless, names))

    def edit(passes: Sequence[PassConfig]) -> tuple[PassConfig, ...]:
        out = []
        for pc in passes:
            mine = {k: v for k, v in values.items() if k in get_pass(pc.name).options}
            out.append(PassConfig.make(pc.name, {**dict(pc.options), **mine}, f"recipe {recipe.name}") if mine else pc)
        return tuple(out)

    when = tuple(replace(w, passes=None if w.passes is None else edit(w.passes)) for w in recipe.when)
    return replace(recipe, passes=edit(recipe.passes), when=when)


def split_pass_options(recipes: Sequence[Recipe], values: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Pass options given once for several recipes (``vitq compare --recipes ... --set``): each recipe takes the
    options one of its passes has; an option none of them has is a one-line error, as for one recipe."""
    mine = [{k: v for k, v in values.items() if any(k in get_pass(pc.name).options for pc in r.all_passes())}
            for r in recipes]
    homeless = sorted(set(values) - {k for m in mine for k in m})
    if homeless:
        raise ConfigError(f"no recipe of {', '.join(r.name for r in recipes)} has a pass with option(s) "
                          f"{', '.join(homeless)}: `vitq list` shows each pass's options")
    return mine


def override_pass_options(recipe: Recipe, **opts: Any) -> Recipe:
    """:func:`set_pass_options` for optional settings: ``None`` means "not given" and is skipped (the
    CLI's ``--iters`` / ``--max-cache-gb`` / ``--resume-dir``, the benches' variants)."""
    return set_pass_options(recipe, {k: v for k, v in opts.items() if v is not None})


# -- targets: a recipe adapted to what a runtime executes as integers ------------------------------------
#: runtimes a recipe can be adapted to (``vitq quantize --target``); ``vitq``'s packed format runs every quantizer
TARGETS = ("onnx",)
#: the nearest integer form of a post-Softmax quantizer that has none: 8-bit uniform over the observed range
INTEGER_POST_SOFTMAX = SiteRule(quantizer="uniform", bits="A", granularity="tensor", observer="minmax")


def for_target(recipe: Recipe, bits: "Bits | str", target: str) -> tuple[Recipe, list[str]]:
    """A copy of ``recipe`` for an integer runtime, and one line per change.

    At 8-bit activations a non-uniform post-Softmax quantizer (log2, log-sqrt2, TanQ, two-scale) has no
    integer kernel in ONNX: exported as it is, it runs as float emulation and the attention's
    probabilities x V product as a float matmul (about half the throughput). For ``target="onnx"`` such a
    rule becomes 8-bit uniform per tensor over the observed range (:data:`INTEGER_POST_SOFTMAX`) *before*
    calibration, so every later pass calibrates and measures the quantizer that is shipped: the simulated
    top-1 is the deployed one. Below 8-bit activations nothing changes: a uniform post-Softmax grid of 16 or
    8 levels costs the attention far more than the float emulation of TanQ / log2 costs speed (those sites
    are emulated exactly). Other sites keep their quantizers; the export reports each one it cannot lower."""
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}: use one of {', '.join(TARGETS)} (or none)")
    b = Bits.parse(bits)
    recipe = recipe.at(b)
    rule = recipe.rule_for("act", Role.ATTN_PROBS, "")
    if rule is None or b.a != 8:
        return recipe, []
    spec = rule.resolve(b)
    if spec.integer_act:
        return recipe, []
    rules = dict(recipe.rules)
    rules[f"act:{Role.ATTN_PROBS.value}"] = INTEGER_POST_SOFTMAX
    note = (f"act:{Role.ATTN_PROBS.value}: {spec.describe()} -> {INTEGER_POST_SOFTMAX.resolve(b).describe()} "
            f"({target} has no integer kernel for {spec.quantizer}; --target none keeps it, emulated in float)")
    return replace(recipe, name=f"{recipe.name}@{target}", rules=tuple(rules.items())), [note]


# -- a run's edits, in the one order every entry point applies them ----------------------------------------
def exclusions(patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--exclude`` values split into role names (upper-cased) and module-name regexes; an upper-case word
    that is no role is a typo, not a regex (one line naming the roles)."""
    roles = {r.value for r in Role}
    by_role, by_name = [], []
    for p in patterns:
        if p.upper() in roles:
            by_role.append(p.upper())
        elif re.fullmatch(r"[A-Z][A-Z0-9_]*", p):
            raise ConfigError(f"--exclude {p}: no such role; roles are {', '.join(sorted(roles))} (or give a "
                              "module-name regex, e.g. 'blocks\\.0\\.')")
        else:
            by_name.append(p)
    return by_role, by_name


def exclude_roles(recipe: Recipe, roles: Sequence[str]) -> Recipe:
    """``recipe`` with every site of these roles (weights and activations) left in float."""
    rules = dict(recipe.rules)
    for r in roles:
        rules[f"act:{r}"] = None
        rules[f"weight:{r}"] = None
    return replace(recipe, rules=tuple(rules.items()))


def edit_recipe(recipe: "Recipe | str", bits: "Bits | str", exclude: Sequence[str] = (),
                sets: Optional[Mapping[str, Any]] = None, target: Optional[str] = None) -> tuple[Recipe, list[str]]:
    """The recipe a run executes, and one line per change ``target`` made: the width's ``when`` blocks
    folded in first (so the edits win over them), then ``exclude`` (roles or module-name regexes left in
    float), then ``sets`` (pass options, :func:`set_pass_options`), then ``target`` (:func:`for_target`).
    The CLI, ``RunSpec``, compare and reproduce all edit through here."""
    r = load_recipe(recipe).at(bits)
    by_role, by_name = exclusions(exclude)
    r = r.with_overrides([("*", p, None) for p in by_name])
    if by_role:
        r = exclude_roles(r, by_role)
    r = set_pass_options(r, dict(sets or {}))
    if target in (None, "none"):
        return r, []
    return for_target(r, bits, str(target))


__all__ = ["DEFAULT_RECIPE", "FAST_RECIPE", "FORMAT_VERSION", "RECIPE_DIR", "TARGETS", "edit_recipe", "exclude_roles",
           "exclusions", "PassConfig", "Recipe", "SiteRule", "When", "for_target", "list_recipes",
           "load_recipe", "override_pass_options", "parse_assignments", "set_pass_options", "split_pass_options"]
