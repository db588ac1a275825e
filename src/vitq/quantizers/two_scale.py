"""Two-scale quantizers: PTQ4ViT twin uniform [V-code], TSPTQ-ViT V-2SF and O-2SF [R].

Notation (METHODS.md "Notation", §3b, §5): ``b`` bits, ``H = 2^{b-1}``, ``Q = H - 1``.

Piecewise-uniform codes (``twin_uniform``, ``v2sf``)
----------------------------------------------------
A b-bit code holds a region flag and a magnitude. Every region ``r`` is a uniform grid
``value = sign_r · m · scale_r`` with an integer magnitude ``m ∈ [m_lo_r, m_hi_r]`` and the code
``base_r + sign_r · m``. All scales of one quantizer are power-of-two multiples of a fine scale
(``scale_large = scale · 2^shift``), so decoding is a shift. Quantization picks, per element, the
region whose nearest grid point is closest to ``x`` (``split_rule: nearest``, default; ties go to the
earlier region), or the region given by a fixed threshold ``τ`` (``split_rule: threshold``,
METHODS.md §3b: small region iff ``x < τ``). Large-region magnitudes below ``m_lo`` would repeat
small-region values; quantize never produces them (they stay decodable), so every value has one
code and ``quantize(dequantize(c)) == c`` for every code quantize emits. The formula lives once, in
:func:`_select` (fake_quant / quantize) and :func:`decompose` (dequantize and the integer kernels).

Layouts:

* ``two`` - codes ``[0, 2^b)`` = ``[flag | (b-1)-bit magnitude]``: small region ``m·S_S``,
  ``m ∈ [0, Q]`` (flag 0); large region ``m·S_L``, ``S_L = 2^shift·S_S`` (flag 1).
* ``pos_neg`` - signed codes ``[-H, Q]``: ``c >= 0 -> c·scale``, ``c < 0 -> c·scale_neg`` (the sign bit
  is the region flag; PTQ4ViT post-GELU).
* ``gelu3`` - codes ``[0, 2^b)``: flag 0 holds a *signed* (b-1)-bit field: ``m·S_S`` for
  ``m ∈ [0, 2^{b-2})`` and ``-m·S_neg`` for ``m ∈ [1, 2^{b-2}]`` (two's complement of the field,
  codes ``2^{b-2} .. H-1``); flag 1 is the large region ``m·S_L`` (``m ∈ [0, Q]``) as in ``two``.

``twin_uniform`` - PTQ4ViT (ECCV 2022), verified from hahnyuan/PTQ4ViT quant_layers/*.py
-----------------------------------------------------------------------------------------
* ``mode: softmax`` (layout ``two``): large region ``[split, 1]`` with ``Δ_high = 1/Q``, small region
  with ``Δ_low = split/Q``, ``split = 2^{-i}``, ``i`` searched over ``0..19`` (``split_exps``); params
  ``scale = Δ_low``, ``shift = i`` (so ``Δ_high = 2^i Δ_low``). Without search ``i = 7``
  (``shift``; 2^-7 is the power of two nearest to PTQ4ViT's initial split 0.01).
* ``mode: gelu`` (layout ``pos_neg``): negatives with the fixed ``Δ_neg = 0.16997/H`` (codes ``-H..-1``),
  positives with ``Δ_pos`` (codes ``0..Q``), searched over ``[α + j(β-α)/n]·Δ_init``, ``j = 0..n``,
  ``Δ_init = max/(H - 1/2)``, ``α = 0.01, β = 1.2, n = 100`` (options ``search_alpha``, ``search_beta``,
  ``search_steps``). Params ``scale = Δ_pos``, ``scale_neg = Δ_neg``.
* Deviations from the released code, deliberate: its softmax forward returns ``x_high + x_low`` where
  both terms are evaluated for every element, so an element ``>= split`` gets ``+split`` from the
  saturated low term and one ``< split`` gets ``round(split·Q)/Q`` from the high term (a bias of up
  to ``split``); we decode one region per code, as the paper describes. The released code switches
  region at ``x = split = Q·Δ_low``; we switch at the nearest-value boundary (``split_rule``).
  The paper's Hessian-guided metric plugs in through the ``metric`` argument of :func:`search_params`.

``v2sf`` - TSPTQ-ViT value-aware two scales: **our reconstruction [R]**, not the paper's formula
-----------------------------------------------------------------------------------------------
Only the abstract is verified (fine scale for dense small values, coarse scale for sparse large
values, power-of-two related; METHODS.md §3b). Our choices, each an option:

* ``mode: softmax`` (layout ``two``): ``S_L = 1/Q`` (``large_scale: one``; ``max``: ``max/Q``),
  ``S_S = S_L / 2^m``, ``m`` searched over ``1..8`` (``shifts``; without search ``shift = 4``). With
  ``large_scale: one`` this is exactly PTQ4ViT's twin softmax with ``split = 2^{-m}`` - the same code
  path; only the search range differs.
* ``mode: gelu``: positives use two scales, ``S_L = c·max/Q`` (clip ratio ``c`` from ``clip_grid``)
  and ``S_S = S_L/2^m``, ``(m, c)`` searched. ``negative`` chooses the negative range:
  ``own_scale`` (default, layout ``gelu3``: a third region with its own small scale
  ``S_neg = 0.16997/2^{b-2}``, or ``|min|/2^{b-2}`` with ``neg_range: observed``),
  ``small_scale`` (layout ``gelu3`` with ``S_neg = S_S``, so decoding needs one scale family only) or
  ``clip`` (negatives -> 0, layout ``two``, all codes for the positives).

Search
------
:func:`search_params` scores candidates with a metric callable ``metric(x_hat, x) -> scalar``
(lower is better; default :func:`mse_metric`), always through :func:`vitq.quantizers.fake_quant`.
The observer calls it through :meth:`init_from_sample` on its calibration sample when
``options: {search: true}`` (default); ``search: false`` uses the closed-form initial values.

``o2sf`` - outlier-aware two scales for LayerNorm inputs: **our reconstruction [R]**
-------------------------------------------------------------------------------------
``X ∈ R^{T×C}``, per-channel range ``r_c = max(|min_c|, |max_c|)`` from calibration; outlier channels
``O = {c : r_c > κ·median_c r_c}`` (``kappa``, default 4); base scale and zero point from the
non-outlier channels (``S_n = (max_{c∉O} - min_{c∉O}) / (2^b - 1)``, asymmetric, zero point
``z_n``); outlier channels use ``S_o = 2^n·S_n``, ``n = ⌈log2(max_{c∈O} r_c / max_{c∉O} r_c)⌉``
(``exponent: absmax``, default; ``fit``: the smallest ``n`` whose shifted range covers the outlier
channels' observed ranges). Zero points (``zero_point``): ``per_level`` (default) gives the outlier
level its own ``z_o`` from the outlier channels' joint minimum; ``shared`` uses ``z_n`` for every
channel, as FQ-ViT's PTF does - with the ``absmax`` exponent that clips an outlier channel whose
values sit on the side of zero where the normal channels have few codes (e.g. an all-positive
outlier channel with ``z_n`` near the top), which is why it is not the default. A 2-level special
case of FQ-ViT's PTF: the formula is :class:`vitq.quantizers.ptf.ShiftedUniform`'s, params
``scale`` (``S_n`` in every channel), ``zero_point`` (``z_n`` or ``z_o``) and ``shift`` (0 or ``n``).
The integer LayerNorm works on ``(q - z_c) << shift_c`` either way.

Why κ = 4: a channel whose range exceeds ``4×`` the median forces a single
scale to spend at least two of the median channel's bits on it; the LayerNorm-input outliers
TSPTQ-ViT addresses are ~40× the median (METHODS.md §3a), well clear of 4, while ordinary channels
vary by less (at most 3.9× in our reference models; METHODS.md §3b suggests κ ∈ 4..8).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, cast

import torch
from torch import Tensor

from ..errors import ConfigError
from ..granularity import PerTensor
from ..options import Options
from .base import Params, QuantSpec, fake_quant, register_quantizer, round_ste
from .ptf import SEARCH_OBSERVERS, ShiftedUniform

log = logging.getLogger(__name__)

#: |min_x GELU(x)| (exact erf GELU), PTQ4ViT's fixed negative range
GELU_MIN = 0.16997124254703522
EPS = 1e-8
Metric = Callable[[Tensor, Tensor], Tensor]


def mse_metric(x_hat: Tensor, x: Tensor) -> Tensor:
    """Mean squared error (the default search metric)."""
    return (x_hat - x).pow(2).mean()


# ----------------------------------------------------------------------------------------------
# region core: the only formula of twin_uniform and v2sf
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Region:
    """One uniform piece: ``value = sign · m · scale`` for ``m ∈ [m_lo, m_hi]``, code ``base + sign·m``.

    ``scale == ldexp(params[unit], shift)``: the integer kernels accumulate regions with the same
    ``unit`` together after shifting by ``shift``. ``alloc_lo`` is the smallest magnitude the region's
    codes decode to (``<= m_lo``). ``x_min`` / ``x_max`` restrict the region to ``[x_min, x_max)``
    (``split_rule: threshold``).
    """

    scale: Tensor
    sign: int
    m_lo: Tensor
    m_hi: int
    base: int
    alloc_lo: int
    unit: str
    shift: Tensor
    x_min: Optional[Tensor] = None
    x_max: Optional[Tensor] = None


def two_scale_options(spec: QuantSpec) -> "TwoScaleOptions":
    """A ``twin_uniform`` / ``v2sf`` spec's typed options."""
    return cast(TwoScaleOptions, spec.opts)


def _layout(spec: QuantSpec) -> str:
    o = two_scale_options(spec)
    if spec.quantizer == "twin_uniform":
        return "two" if o.mode == "softmax" else "pos_neg"
    if o.mode == "softmax" or o.negative == "clip":
        return "two"
    return "gelu3"


def _first_large(small_top: int, shift: Tensor, q: int) -> Tensor:
    """Smallest large-region magnitude whose value lies above the small region's top value."""
    k0 = torch.floor(torch.ldexp(torch.full_like(shift, float(small_top)), -shift.to(torch.int32))) + 1
    return k0.clamp_max(q)  # shift 0: no large values beyond the small ones; duplicates lose ties


def regions(p: Params, spec: QuantSpec) -> list[Region]:
    """The regions of a ``twin_uniform`` / ``v2sf`` spec with parameters ``p`` (per-tensor)."""
    b = spec.bits
    h, q = 2 ** (b - 1), 2 ** (b - 1) - 1
    s = p["scale"]
    shift = p["shift"].round()
    zero = torch.zeros_like(shift)
    layout = _layout(spec)
    if layout == "pos_neg":
        return [Region(s, 1, zero, q, 0, 0, "scale", zero),
                Region(p["scale_neg"], -1, zero + 1, h, 0, 1, "scale_neg", zero)]
    large = torch.ldexp(s, shift.to(torch.int32))
    threshold = two_scale_options(spec).split_rule == "threshold"
    if layout == "two":
        tau = s * h if threshold else None
        return [Region(s, 1, zero, q, 0, 0, "scale", zero, x_max=tau),
                Region(large, 1, _first_large(q, shift, q), q, h, 0, "scale", shift, x_min=tau)]
    h2 = 2 ** (b - 2)
    tau = s * h2 if threshold else None
    if two_scale_options(spec).negative == "small_scale":
        neg = Region(s, -1, zero + 1, h2, h, 1, "scale", zero)
    else:
        neg = Region(p["scale_neg"], -1, zero + 1, h2, h, 1, "scale_neg", zero)
    return [Region(s, 1, zero, h2 - 1, 0, 0, "scale", zero, x_max=tau), neg,
            Region(large, 1, _first_large(h2 - 1, shift, q), q, h, 0, "scale", shift, x_min=tau)]


def _select(x: Tensor, regs: Sequence[Region], rnd: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """``(codes, values)``: per element the region whose nearest grid value is closest to ``x``.

    Gradient (``rnd = round_ste``): straight-through w.r.t. ``x`` everywhere inside the quantizer's
    overall range ``[lowest level, highest level]`` - also in the gap between the small region's top
    and the first large value, where the chosen region is saturated - and 0 outside it; the scales
    get the chosen region's LSQ-style gradient.
    """
    xd = x.detach()
    best_c = best_v = best_e = best_sat = None
    g_lo = g_hi = None
    for r in regs:
        lo = r.m_lo.to(x.dtype)
        hi = torch.full_like(lo, float(r.m_hi))
        y = r.sign * x / r.scale
        # clamp before rounding (integer bounds: same codes); straight-through gradient inside
        m = rnd(torch.clamp(y, min=lo, max=hi))
        v = (r.sign * m) * r.scale
        e = (xd - v.detach()).abs()
        if r.x_min is not None:
            e = torch.where(xd >= r.x_min, e, torch.full_like(e, math.inf))
        if r.x_max is not None:
            e = torch.where(xd < r.x_max, e, torch.full_like(e, math.inf))
        c = r.base + r.sign * m.detach()
        sat = (y.detach() < lo) | (y.detach() > hi)
        ends = torch.stack([r.sign * lo * r.scale, r.sign * hi * r.scale]).detach()
        g_lo = ends.amin(0) if g_lo is None else torch.minimum(g_lo, ends.amin(0))
        g_hi = ends.amax(0) if g_hi is None else torch.maximum(g_hi, ends.amax(0))
        if best_c is None or best_v is None or best_e is None or best_sat is None:
            best_c, best_v, best_e, best_sat = c, v, e, sat
            continue
        better = e < best_e
        best_c = torch.where(better, c, best_c)
        best_v = torch.where(better, v, best_v)
        best_e = torch.where(better, e, best_e)
        best_sat = torch.where(better, sat, best_sat)
    assert best_c is not None and best_v is not None and best_sat is not None and g_lo is not None and g_hi is not None
    if x.requires_grad:
        gap = best_sat & (xd >= g_lo) & (xd <= g_hi)
        best_v = best_v + torch.where(gap, x - xd, torch.zeros_like(x))  # adds exact zeros
    return best_c, best_v


def decompose(codes: Tensor, p: Params, spec: QuantSpec) -> list[tuple[Region, Tensor]]:
    """Split codes into ``(region, signed magnitude)`` pairs; the magnitude is 0 outside the region.

    ``dequantize(codes) == Σ_r (sign_r m_r) · scale_r`` - the integer kernels use the int parts.
    """
    c = codes.long()
    out = []
    for r in regions(p, spec):
        m = r.sign * (c - r.base)
        inside = (m >= r.alloc_lo) & (m <= r.m_hi)
        out.append((r, torch.where(inside, r.sign * m, torch.zeros_like(m))))
    return out


# ----------------------------------------------------------------------------------------------
# option checking
# ----------------------------------------------------------------------------------------------
MODES = ("softmax", "gelu")
SPLIT_RULES = ("nearest", "threshold")
NEGATIVE = ("own_scale", "small_scale", "clip")
NEG_RANGE = ("gelu_min", "observed")
LARGE_SCALE = ("one", "max")
COMMON = ("mode", "search", "shift", "split_rule")
TWIN_OPTIONS = {"softmax": COMMON + ("split_exps",),
                "gelu": ("mode", "search", "search_alpha", "search_beta", "search_steps")}
V2SF_OPTIONS = {"softmax": COMMON + ("shifts", "large_scale"),
                "gelu": COMMON + ("shifts", "clip_grid", "negative", "neg_range")}
DEFAULT_SHIFT = {"twin_uniform": 7, "v2sf": 4}
DEFAULT_SHIFTS = tuple(range(1, 9))
DEFAULT_SPLIT_EXPS = tuple(range(20))
DEFAULT_CLIP_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def _ints(name: str, v: Any, lo: int, hi: int) -> tuple[int, ...]:
    vals = tuple(v) if isinstance(v, (list, tuple)) else (v,)
    if not vals or any(isinstance(i, bool) or not isinstance(i, int) or not lo <= i <= hi for i in vals):
        raise ConfigError(f"option {name}={v!r} must be integers from {lo} to {hi}")
    return vals


def _number(name: str, v: Any, lo: float, hi: float, open_lo: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo < v if open_lo else lo <= v) or v > hi:
        raise ConfigError(f"option {name}={v!r} must be a number in {'(' if open_lo else '['}{lo}, {hi}]")
    return float(v)


def _choice(name: str, v: Any, allowed: Sequence[str]) -> str:
    if v not in allowed:
        raise ConfigError(f"option {name}={v!r} is unknown: use one of {', '.join(allowed)}")
    return str(v)


@dataclass(frozen=True)
class TwoScaleOptions(Options):
    """The options of ``v2sf`` (and, with ``shift`` 7, of ``twin_uniform``; each quantizer and mode takes the
    subset :data:`TWIN_OPTIONS` / :data:`V2SF_OPTIONS` names). The module docstring says what each does. Lists
    are kept as tuples; a single number where a list belongs is a list of one."""

    mode: str = "softmax"
    search: bool = True
    shift: int = DEFAULT_SHIFT["v2sf"]
    split_rule: str = "nearest"
    split_exps: tuple[int, ...] = field(default=DEFAULT_SPLIT_EXPS, metadata={"any_type": True})
    shifts: tuple[int, ...] = field(default=DEFAULT_SHIFTS, metadata={"any_type": True})
    large_scale: str = "one"
    clip_grid: tuple[float, ...] = field(default=DEFAULT_CLIP_GRID, metadata={"any_type": True})
    negative: str = "own_scale"
    neg_range: str = "gelu_min"
    search_alpha: float = 0.01
    search_beta: float = 1.2
    search_steps: int = 100

    def validate(self) -> None:
        _choice("mode", self.mode, MODES)
        if isinstance(self.shift, bool) or not isinstance(self.shift, int) or not 0 <= self.shift <= 24:
            raise ConfigError(f"option shift={self.shift!r} must be an integer from 0 to 24")
        object.__setattr__(self, "split_exps", _ints("split_exps", self.split_exps, 0, 24))
        object.__setattr__(self, "shifts", _ints("shifts", self.shifts, 0, 24))
        _choice("split_rule", self.split_rule, SPLIT_RULES)
        _choice("large_scale", self.large_scale, LARGE_SCALE)
        _choice("negative", self.negative, NEGATIVE)
        _choice("neg_range", self.neg_range, NEG_RANGE)
        grid = tuple(self.clip_grid) if isinstance(self.clip_grid, (list, tuple)) else (self.clip_grid,)
        object.__setattr__(self, "clip_grid", tuple(_number("clip_grid", c, 0.0, 1.0, open_lo=True) for c in grid))
        a = _number("search_alpha", self.search_alpha, 0.0, 100.0, open_lo=True)
        b = _number("search_beta", self.search_beta, 0.0, 100.0, open_lo=True)
        if b < a:
            raise ConfigError(f"search_beta {b} must be >= search_alpha {a}")
        if isinstance(self.search_steps, bool) or not isinstance(self.search_steps, int) \
                or not 1 <= self.search_steps <= 10_000:
            raise ConfigError(f"option search_steps={self.search_steps!r} must be an integer from 1 to 10000")


@dataclass(frozen=True)
class TwinOptions(TwoScaleOptions):
    """``twin_uniform``'s options: :class:`TwoScaleOptions` with PTQ4ViT's initial split ``2^-7``."""

    shift: int = DEFAULT_SHIFT["twin_uniform"]


class _TwoScale:
    """Shared maths of ``twin_uniform`` and ``v2sf`` (per-tensor, piecewise-uniform codes)."""

    name = "two_scale"
    param_names: tuple[str, ...] = ("scale", "shift", "scale_neg")

    # -- spec ----------------------------------------------------------------------------------
    def _allowed(self, mode: str) -> tuple[str, ...]:
        raise NotImplementedError

    def check_spec(self, spec: QuantSpec) -> None:
        who = self.name
        if spec.symmetric:
            raise ConfigError(f"{who} sets its own code layout: set symmetric: false")
        if not isinstance(spec.granularity, PerTensor):
            raise ConfigError(f"{who} supports per-tensor granularity only: set granularity: tensor")
        if spec.observer in SEARCH_OBSERVERS:
            raise ConfigError(f"{who} searches its own parameters (options: search): use observer minmax or percentile")
        if spec.bits < 3 and _layout(spec) == "gelu3":
            raise ConfigError(f"{who} gelu with negative {spec.opts.negative} needs at least 3 bits: "
                              "raise bits or set negative: clip")
        allowed = self._allowed(spec.opts.mode)
        unknown = sorted(k for k, _ in spec.options if k not in allowed)
        if unknown:
            raise ConfigError(f"{who} mode {spec.opts.mode} has no option(s) {unknown}: allowed are {list(allowed)}")

    def code_range(self, spec: QuantSpec) -> tuple[int, int]:
        if _layout(spec) == "pos_neg":
            return -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
        return 0, 2 ** spec.bits - 1

    # -- maths ---------------------------------------------------------------------------------
    def quantize(self, x: Tensor, p: Params, spec: QuantSpec) -> Tensor:
        return _select(x, regions(p, spec), torch.round)[0].to(torch.int32)

    def dequantize(self, codes: Tensor, p: Params, spec: QuantSpec) -> Tensor:
        out: Optional[Tensor] = None
        for r, m in decompose(codes, p, spec):
            v = m.to(r.scale.dtype) * r.scale  # m is 0 outside the region: adds exact zeros
            out = v if out is None else out + v
        assert out is not None
        return out

    def fake_quant(self, x: Tensor, p: Params, spec: QuantSpec) -> Tensor:
        return _select(x, regions(p, spec), round_ste)[1]

    def used_codes(self, p: Params, spec: QuantSpec) -> Tensor:
        """Every code :meth:`quantize` can emit (one per representable value), ascending."""
        codes = []
        for r in regions(p, spec):
            for m in range(int(r.m_lo.reshape(-1)[0]), r.m_hi + 1):
                codes.append(r.base + r.sign * m)
        return torch.tensor(sorted(set(codes)), dtype=torch.int32)

    def levels(self, p: Params, spec: QuantSpec) -> Tensor:
        """All representable values, ascending."""
        return self.dequantize(self.used_codes(p, spec), p, spec).sort().values

    # -- parameters ----------------------------------------------------------------------------
    def candidates(self, lo: Tensor, hi: Tensor, spec: QuantSpec) -> Iterator[Params]:
        raise NotImplementedError

    def init_params(self, lo: Tensor, hi: Tensor, spec: QuantSpec) -> Params:
        raise NotImplementedError

    def init_from_sample(self, rows: Tensor, lo: Tensor, hi: Tensor, spec: QuantSpec) -> Params:
        """Observer hook: search on the calibration sample (``search: true``) or the closed form."""
        if not two_scale_options(spec).search:
            return self.init_params(lo, hi, spec)
        return search_params(rows, spec, lo=lo, hi=hi)


def _params(scale: Tensor, shift: float, scale_neg: Tensor | float) -> Params:
    scale = scale.float().reshape(-1)[:1]
    return {"scale": scale, "shift": torch.full_like(scale, float(shift)),
            "scale_neg": torch.as_tensor(scale_neg, dtype=torch.float32).reshape(-1)[:1].expand_as(scale).clone()}


def _hi(hi: Tensor) -> Tensor:
    return hi.float().reshape(-1)[:1].clamp_min(EPS)


class TwinUniformQuantizer(_TwoScale):
    """PTQ4ViT twin uniform quantizer (``twin_uniform``), see the module docstring."""

    name = "twin_uniform"
    Options = TwinOptions

    def _allowed(self, mode: str) -> tuple[str, ...]:
        return TWIN_OPTIONS[mode]

    def init_params(self, lo: Tensor, hi: Tensor, spec: QuantSpec) -> Params:
        b = spec.bits
        h, q = 2 ** (b - 1), 2 ** (b - 1) - 1
        if two_scale_options(spec).mode == "softmax":
            return self._softmax(q, two_scale_options(spec).shift)
        return _params(_hi(hi) / (h - 0.5), 0, GELU_MIN / h)

    @staticmethod
    def _softmax(q: int, i: int) -> Params:
        """``Δ_high = 1/Q``, ``split = 2^-i``, ``Δ_low = split/Q`` (exactly ``Δ_high · 2^-i``)."""
        return _params(torch.ldexp(torch.tensor([1.0 / q]), torch.tensor([-i])), i, 0.0)

    def candidates(self, lo: Tensor, hi: Tensor, spec: QuantSpec) -> Iterator[Params]:
        o = two_scale_options(spec)
        if o.mode == "softmax":
            q = 2 ** (spec.bits - 1) - 1
            for i in o.split_exps:
                yield self._softmax(q, i)
            return
        base = self.init_params(lo, hi, spec)
        a, bta, n = float(o.search_alpha), float(o.search_beta), int(o.search_steps)
        for j in range(n + 1):
            yield {**base, "scale": base["scale"] * (a + j * (bta - a) / n)}


class V2SFQuantizer(_TwoScale):
    """TSPTQ-ViT value-aware two-scale quantizer (``v2sf``), our reconstruction [R]."""

    name = "v2sf"
    Options = TwoScaleOptions

    def _allowed(self, mode: str) -> tuple[str, ...]:
        return V2SF_OPTIONS[mode]

    def _large(self, hi: Tensor, spec: QuantSpec, clip: float = 1.0) -> Tensor:
        q = 2 ** (spec.bits - 1) - 1
        o = two_scale_options(spec)
        if o.mode == "softmax" and o.large_scale == "one":
            return torch.tensor([1.0 / q])
        return _hi(hi) * clip / q

    def _neg(self, lo: Tensor, spec: QuantSpec) -> float | Tensor:
        o = two_scale_options(spec)
        if _layout(spec) != "gelu3" or o.negative != "own_scale":
            return 0.0
        h2 = 2 ** (spec.bits - 2)
        if o.neg_range == "observed":
            return (-lo.float().reshape(-1)[:1]).clamp_min(EPS) / h2
        return GELU_MIN / h2

    def _at(self, lo: Tensor, hi: Tensor, spec: QuantSpec, m: int, clip: float) -> Params:
        large = self._large(hi, spec, clip)
        return _params(torch.ldexp(large, torch.tensor([-m])), m, self._neg(lo, spec))

    def init_params(self, lo: Tensor, hi: Tensor, spec: QuantSpec) -> Params:
        return self._at(lo, hi, spec, two_scale_options(spec).shift, 1.0)

    def candidates(self, lo: Tensor, hi: Tensor, spec: QuantSpec) -> Iterator[Params]:
        o = two_scale_options(spec)
        clips: Iterable[float] = o.clip_grid if o.mode == "gelu" else (1.0,)
        for c in clips:
            for m in o.shifts:
                yield self._at(lo, hi, spec, m, float(c))


def search_params(x: Tensor, spec: QuantSpec, metric: Metric = mse_metric,
                  lo: Optional[Tensor] = None, hi: Optional[Tensor] = None) -> Params:
    """Grid search of a ``twin_uniform`` / ``v2sf`` spec's parameters on sample ``x``.

    Candidates (per the module docstring): twin softmax ``split = 2^{-i}``, ``i ∈ split_exps``;
    twin gelu ``Δ_pos ∈ [α + j(β-α)/n]·Δ_init``; v2sf ``m ∈ shifts`` (× clip ratios for gelu).
    Each candidate is scored as ``metric(fake_quant(x, p), x)`` (lower is better; ties keep the
    earlier candidate), so a Hessian-guided or output-error metric plugs in as a closure.
    ``lo`` / ``hi`` default to the sample's min / max.
    """
    q = QUANTIZER_BY_NAME.get(spec.quantizer)
    if q is None:
        raise ConfigError(f"search_params needs a twin_uniform or v2sf spec, got {spec.quantizer!r}")
    x = x.detach().float()
    lo = x.min().reshape(1) if lo is None else lo
    hi = x.max().reshape(1) if hi is None else hi
    best: Optional[Params] = None
    best_err = math.inf
    with torch.no_grad():
        for cand in q.candidates(lo, hi, spec):
            cand = {k: v.to(x.device) for k, v in cand.items()}
            err = float(metric(fake_quant(x, cand, spec), x))
            if best is None or err < best_err:
                best, best_err = cand, err
    assert best is not None
    log.debug("%s search: scale %.4g shift %d error %.4g", spec.quantizer, float(best["scale"][0]),
              int(best["shift"][0]), best_err)
    return best


# ----------------------------------------------------------------------------------------------
# O-2SF
# ----------------------------------------------------------------------------------------------
EXPONENT_RULES = ("absmax", "fit")
ZERO_POINTS = ("per_level", "shared")


def outlier_channels(lo: Tensor, hi: Tensor, kappa: float = 4.0) -> Tensor:
    """``r_c > κ · median_c r_c`` with ``r_c = max(|lo_c|, |hi_c|)`` (boolean, one per channel).

    The median is the lower median (``torch.median``) for an even channel count.
    """
    r = torch.maximum(lo.float().abs(), hi.float().abs()).reshape(-1)
    return (r > kappa * r.median()).reshape(lo.shape)


@dataclass(frozen=True)
class O2SFOptions(Options):
    """``kappa``: the outlier threshold (a channel whose range exceeds ``kappa`` x the median); ``exponent``:
    ``absmax`` or ``fit``; ``zero_point``: ``per_level`` or ``shared`` (the module docstring)."""

    kappa: float = 4.0
    exponent: str = "absmax"
    zero_point: str = "per_level"

    def validate(self) -> None:
        _number("kappa", self.kappa, 1.0, 1e6, open_lo=True)
        _choice("exponent", self.exponent, EXPONENT_RULES)
        _choice("zero_point", self.zero_point, ZERO_POINTS)


class O2SFQuantizer(ShiftedUniform):
    """TSPTQ-ViT outlier-aware two-scale quantizer (``o2sf``), our reconstruction [R]."""

    name = "o2sf"
    Options = O2SFOptions

    def check_spec(self, spec: QuantSpec) -> None:
        self._check_common(spec)

    def init_params(self, lo: Tensor, hi: Tensor, spec: QuantSpec) -> Params:
        lo, hi = self._range(lo, hi)
        qmax = 2 ** spec.bits - 1
        o = spec.opts
        out = outlier_channels(lo, hi, float(o.kappa))
        r = torch.maximum(-lo, hi)
        if bool(out.all()) or float(r[~out].max()) <= 0:
            out = torch.zeros_like(out)
        normal = ~out
        lo_n, hi_n = lo[normal].min(), hi[normal].max()
        s, z_n = self._base(lo_n, hi_n, 0, spec)
        n, z_o = torch.zeros_like(s), z_n
        per_level = o.zero_point == "per_level"
        if bool(out.any()):
            lo_o, hi_o = lo[out].min(), hi[out].max()
            if o.exponent == "absmax":
                n = torch.ceil(torch.log2(r[out].max() / r[normal].max()))
            elif per_level:  # the outliers' joint range fits 2^n times the normal width
                n = torch.ceil(torch.log2((hi_o - lo_o) / (hi_n - lo_n)) - 1e-6)
            else:  # every outlier channel fits around the shared zero point (sides that cannot: ignored)
                need = self._covering_shift(lo[out], hi[out], s, z_n, spec)
                n = torch.where(torch.isinf(need), torch.zeros_like(need), need).max()
            n = n.clamp(0, 24)
            if per_level:
                z_o = torch.clamp(torch.round(-lo_o / torch.ldexp(s, n.to(torch.int32))), 0, qmax)
        return {"scale": s.expand_as(hi).clone(),
                "zero_point": torch.where(out, z_o, z_n).float(),
                "shift": torch.where(out, n, torch.zeros_like(n)).float()}


TWIN_UNIFORM = register_quantizer(TwinUniformQuantizer())
V2SF = register_quantizer(V2SFQuantizer())
O2SF = register_quantizer(O2SFQuantizer())
QUANTIZER_BY_NAME: dict[str, Any] = {"twin_uniform": TWIN_UNIFORM, "v2sf": V2SF}

__all__ = [
    "GELU_MIN", "Metric", "O2SFQuantizer", "Region", "TwinUniformQuantizer", "V2SFQuantizer", "decompose",
    "mse_metric", "outlier_channels", "regions", "search_params",
]
