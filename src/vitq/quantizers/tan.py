"""TanQ: a tangent-based companding quantizer for post-Softmax values in ``[0, s]``.

**This is OUR reconstruction [R] of DopQ-ViT's TanQ, not the paper's formula.** The paper's
equation was not available to us (METHODS.md §1b(iii)); what is verified is only that TanQ is
tangent-based, non-uniform, aimed at post-Softmax values and spends precision near 1 (and near 0).
Everything below - the level functions, the shape parameter θ, its calibration - is a proposal
that must be checked against the paper before any result is called "DopQ-ViT's TanQ".

Two level functions, chosen with ``options: {level_fn: tan | logtan, theta: θ}``; ``N = 2^b``:

``tan`` (default; METHODS.md §1b(iii) Variant A, symmetric tan companding on ``[0, s]``)::

    T      = tan(θπ/2)
    g(a)   = tan(θπ (a/s - 1/2))                       # [0, s] -> [-T, T]
    q      = clamp(round((g(clamp(a, 0, s)) + T) (N-1) / (2T)), 0, N-1)
    LUT[q] = s (1/2 + arctan(-T + 2Tq/(N-1)) / (θπ))   # LUT[0] = 0, LUT[N-1] = s

A uniform grid in the tan domain: levels are dense near 0 *and* near s, sparse in the middle;
θ -> 0 gives the uniform quantizer, θ -> 1 pushes levels towards both ends. Default θ = 0.9.
(b=3, θ=0.8: 0, .045, .133, .335, .665, .867, .955, 1.)

``logtan`` (METHODS.md §1b(iii) Variant B, "log-tan", generalised here with θ)::

    u(a)   = tan(θπ/2 · clamp(a, 0, s)/s) / T          # [0, s] -> [0, 1]
    q      = round(-log2 u(a)),  q >= N-1 -> N-1 (the zero code)
    LUT[q] = s · arctan(T 2^-q) / (θπ/2)  for q < N-1,   LUT[N-1] = 0

A power-of-two grid in the tan domain: log2-like density near 0 plus extra levels near s. With
θ = 0.5 (its default) it is exactly METHODS.md's ``(4/π) arctan(2^-q)``
(b=3: 1, .590, .312, .158, .080, .040, .020, 0); the θ dependence is our generalisation.

Codes are integers ``0 .. 2^b - 1`` and dequantization is a lookup in a ``2^b``-entry table
computed from the parameters ``scale`` (= s) and ``theta`` (both tensors, so FakeQuant keeps them
as buffers). ``fake_quant`` returns ``LUT[codes]`` with a straight-through gradient w.r.t. ``x``
inside ``[0, s]`` (zero outside) and the table's own gradient w.r.t. ``scale`` and ``theta``.
Per-tensor granularity only. Calibration of θ and s by attention-output error:
:func:`search_theta` (used by the ``tanq_calibrate`` pass).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from ..errors import ConfigError
from ..granularity import PerTensor
from ..options import Options, need
from .base import Params, QuantSpec, register_quantizer

TINY = 1e-30
LEVEL_FNS = ("tan", "logtan")
DEFAULT_THETA = {"tan": 0.9, "logtan": 0.5}
#: θ grid of the per-layer search (METHODS.md §1b(iii) proposal)
THETA_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)


@dataclass(frozen=True)
class TanOptions(Options):
    """``level_fn``: ``tan`` (DopQ-ViT's levels) or ``logtan`` (power-of-two spaced, [R]); ``theta``: the initial
    angle fraction in (0, 1) (None: the level function's own, :data:`DEFAULT_THETA`)."""

    level_fn: str = "tan"
    theta: Optional[float] = field(default=None, metadata={"any_type": True})

    def validate(self) -> None:
        need(self.level_fn in LEVEL_FNS, f"level_fn {self.level_fn!r} is unknown: use one of {', '.join(LEVEL_FNS)}")
        t = self.theta
        need(t is None or (not isinstance(t, bool) and isinstance(t, (int, float)) and 0.0 < float(t) < 1.0),
             f"theta {t!r} must be a number strictly between 0 and 1 (e.g. 0.9)")

    @property
    def initial_theta(self) -> float:
        return float(DEFAULT_THETA[self.level_fn] if self.theta is None else self.theta)


def level_fn(spec: QuantSpec) -> str:
    return str(spec.opts.level_fn)


def default_theta(spec: QuantSpec) -> float:
    return float(spec.opts.initial_theta)


def _scalar(p: Params, name: str) -> Tensor:
    v = p[name]
    if v.numel() != 1:
        raise ConfigError(f"tanq parameter {name!r} must hold one value (per-tensor), got shape "
                          f"{tuple(v.shape)}: use granularity 'tensor'")
    return v.reshape(())


def lut(p: Params, spec: QuantSpec) -> Tensor:
    """The ``2^b``-entry dequantization table ``LUT[code]`` (differentiable in scale and theta)."""
    s, theta = _scalar(p, "scale"), _scalar(p, "theta")
    n = 2 ** spec.bits
    q = torch.arange(n, dtype=s.dtype, device=s.device)
    half_angle = theta * (math.pi / 2)
    t_max = torch.tan(half_angle)
    if level_fn(spec) == "tan":
        u = -t_max + q * (2 * t_max / (n - 1))
        table = s * (0.5 + torch.atan(u) / (2 * half_angle))
        # pin the ends: LUT[0] = 0 and LUT[N-1] = s exactly, whatever the float rounding
        ends = torch.zeros_like(table)
        ends[-1] = 1.0
        is_end = (q == 0) | (q == n - 1)
        return torch.where(is_end, s * ends, table)
    table = s * torch.atan(t_max * torch.pow(2.0, -q)) / half_angle
    table = torch.where(q == 0, s.expand_as(table), table)
    return torch.where(q == n - 1, torch.zeros_like(table), table)


class TanQuantizer:
    name = "tanq"
    param_names: tuple[str, ...] = ("scale", "theta")
    Options = TanOptions

    def check_spec(self, spec: QuantSpec) -> None:
        if spec.symmetric:
            raise ConfigError("tanq quantizer is for non-negative (post-Softmax) values: set symmetric: false")
        if not isinstance(spec.granularity, PerTensor):
            raise ConfigError("tanq quantizer supports per-tensor granularity only: set granularity: tensor")

    def code_range(self, spec: QuantSpec) -> tuple[int, int]:
        return 0, 2 ** spec.bits - 1

    def init_params(self, lo: Tensor, hi: Tensor, spec: QuantSpec) -> Params:
        """``scale`` = the observed upper end (max, or a percentile); ``theta`` from the options."""
        scale = hi.float().clamp_min(TINY)
        return {"scale": scale, "theta": torch.full_like(scale, default_theta(spec))}

    def _codes(self, x: Tensor, p: Params, spec: QuantSpec) -> Tensor:
        """Float-valued integer codes (no gradient: the STE is added in :meth:`fake_quant`)."""
        s, theta = _scalar(p, "scale").detach(), _scalar(p, "theta").detach()
        n = 2 ** spec.bits
        half_angle = theta * (math.pi / 2)
        t_max = torch.tan(half_angle)
        r = torch.minimum(torch.clamp(x.detach().to(s.dtype), min=0.0) / s, torch.ones_like(s))
        if level_fn(spec) == "tan":
            g = torch.tan(2 * half_angle * (r - 0.5))
            return torch.clamp(torch.round((g + t_max) * ((n - 1) / (2 * t_max))), 0, n - 1)
        u = (torch.tan(half_angle * r) / t_max).clamp_min(TINY)
        return torch.clamp(torch.round(-torch.log2(u)), 0, n - 1)

    def quantize(self, x: Tensor, p: Params, spec: QuantSpec) -> Tensor:
        return self._codes(x, p, spec).to(torch.int32)

    def dequantize(self, codes: Tensor, p: Params, spec: QuantSpec) -> Tensor:
        return lut(p, spec)[codes.long()]

    def fake_quant(self, x: Tensor, p: Params, spec: QuantSpec) -> Tensor:
        codes = self._codes(x, p, spec).long()
        s = _scalar(p, "scale").detach()
        xc = torch.minimum(torch.clamp(x.to(s.dtype), min=0.0), s)
        # value: exactly LUT[codes]; gradient: identity w.r.t. x inside [0, s] (straight-through)
        return lut(p, spec)[codes] + (xc - xc.detach())

    def levels(self, p: Params, spec: QuantSpec) -> Tensor:
        """All representable values, ascending."""
        return lut(p, spec).sort().values


# ----------------------------------------------------------------------------------------------
# calibration: θ and s by attention-output error
# ----------------------------------------------------------------------------------------------
def attention_output_error(attn: Tensor, v: Tensor, p: Params, spec: QuantSpec,
                           chunk: int = 64) -> float:
    """``Σ ||A·V − Â·V||²`` with ``Â = fake_quant(A)`` (any quantizer of the spec), in chunks of
    ``chunk`` leading rows so that memory stays bounded."""
    from .base import fake_quant

    total = 0.0
    with torch.no_grad():
        for i in range(0, attn.shape[0], chunk):
            a, vv = attn[i:i + chunk], v[i:i + chunk]
            total += ((a - fake_quant(a, p, spec)) @ vv).pow(2).sum().item()
    return total


def scale_candidates(attn: Tensor, which: Sequence[Any], percentile: float = 0.9999,
                     max_sample: int = 1 << 22, seed: int = 0) -> list[float]:
    """Candidate ranges s: ``"one"`` (1.0), ``"max"`` (max A), ``"quantile"`` (the ``percentile``
    quantile of A, from a seeded sample of at most ``max_sample`` values) or a number."""
    out: list[float] = []
    flat: Tensor | None = None
    for w in which:
        if isinstance(w, (int, float)) and not isinstance(w, bool):
            val = float(w)
        elif w == "one":
            val = 1.0
        elif w == "max":
            val = float(attn.max())
        elif w == "quantile":
            if flat is None:
                flat = attn.detach().flatten().float()
                if flat.numel() > max_sample:
                    g = torch.Generator().manual_seed(seed)
                    flat = flat[torch.randint(flat.numel(), (max_sample,), generator=g).to(flat.device)]
            k = min(flat.numel(), max(1, int(round(percentile * flat.numel()))))
            val = float(flat.kthvalue(k).values)
        else:
            raise ConfigError(f"tanq scale candidate {w!r} is unknown: use 'one', 'max', 'quantile' or a number")
        if not val > 0:
            raise ConfigError(f"tanq scale candidate {w!r} gave s = {val}: the attention values are all zero")
        if val not in out:
            out.append(val)
    return out


def search_theta(attn: Tensor, v: Tensor, spec: QuantSpec, grid: Sequence[float] = THETA_GRID,
                 scales: Sequence[Any] = ("one", "quantile"), percentile: float = 0.9999,
                 ) -> tuple[Params, list[dict[str, float]]]:
    """Grid search of TanQ's ``(θ, s)`` minimising the attention-output error
    ``||A·V − Â·V||²`` (METHODS.md §1b(iii) [R]). Pure: ``attn`` (..., N, N) post-Softmax
    probabilities and ``v`` (..., N, d) the values they multiply, both float.

    Returns the best parameters and the table of every candidate's error (``theta``, ``scale``,
    ``error``). Ties keep the earlier candidate. Every candidate is scored through
    :func:`vitq.quantizers.fake_quant`, the quantizer's only formula.
    """
    if spec.quantizer != "tanq":
        raise ConfigError(f"search_theta needs a tanq spec, got {spec.quantizer!r}: set quantizer: tanq")
    if not grid:
        raise ConfigError("search_theta needs at least one theta: pass e.g. grid=(0.8, 0.9)")
    for t in grid:
        if not 0.0 < float(t) < 1.0:
            raise ConfigError(f"theta {t!r} in the search grid must be strictly between 0 and 1")
    attn, v = attn.detach().float(), v.detach().float()
    table: list[dict[str, float]] = []
    best: tuple[float, float, float] | None = None
    for s in scale_candidates(attn, scales, percentile):
        for t in grid:
            p = {"scale": torch.tensor(s, device=attn.device), "theta": torch.tensor(float(t), device=attn.device)}
            err = attention_output_error(attn, v, p, spec)
            table.append({"theta": float(t), "scale": s, "error": err})
            if best is None or err < best[0]:
                best = (err, s, float(t))
    assert best is not None
    return {"scale": torch.tensor(best[1]), "theta": torch.tensor(best[2])}, table


register_quantizer(TanQuantizer())
