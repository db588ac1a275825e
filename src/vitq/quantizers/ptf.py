"""Power-of-two-factor (PTF) quantizer for LayerNorm inputs (FQ-ViT, METHODS.md §5) [V-code].

One layer-wise base scale ``s`` and zero point ``z`` shared by every channel, and a per-channel
integer shift ``α_c``; channel ``c`` is quantized with the scale ``s · 2^{α_c}``::

    q = clamp(round(x / (s 2^{α_c}) + z), 0, 2^b - 1),     x_hat = (q - z) · s · 2^{α_c}

FQ-ViT's observer (``models/ptq/observer/ptf.py``): ``s = (max - min) / (2^b - 1) / 2^K`` with
``K = 3``, ``z = clamp(round(-min / (s 2^K)), 0, 2^b - 1)`` (the zero point of the *largest*
scale, so every channel can reach the layer's range at ``α = K``), and ``α_c ∈ {0..K}`` chosen per
channel as the one with the smallest L2 quantization error on calibration data (ties: the
smaller ``α``). Integer LayerNorm then needs only ``(q - z) << α_c`` before the mean and variance
(:mod:`vitq.integer.two_scale_ref`).

This file holds the *shifted-uniform* formula above once (:class:`ShiftedUniform`); FQ-ViT's PTF
(:class:`PTFQuantizer`, registered as ``ptf``) and TSPTQ-ViT's O-2SF
(:class:`vitq.quantizers.two_scale.O2SFQuantizer`, a 2-level special case, our reconstruction)
only differ in how they choose ``s``, ``z`` and the shifts.

Differences from FQ-ViT's code, all deliberate:

* the range always includes 0 (``min <= 0 <= max``), as our uniform quantizer does, so ``z`` is a
  valid code even for an all-positive layer;
* the L2 choice of ``α_c`` uses the observer's bounded random sample of all calibration batches
  (FQ-ViT scores the last calibration batch only);
* without a sample (``options: {shift_rule: range}`` or a direct :func:`init_params` call) ``α_c``
  is the smallest shift whose range covers channel ``c``'s observed ``[min_c, max_c]``.

Options: ``max_shift`` (``K``, default 3), ``shift_rule`` (``l2`` default, or ``range``).
Parameters (per channel, shape ``(C,)`` after the observer's reshape): ``scale`` (the base ``s``,
the same value in every channel), ``zero_point`` (``z``, the same in every channel) and ``shift``
(``α_c``, integer-valued).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from ..granularity import PerChannel
from ..options import Options, is_int, need
from .base import Params, QuantSpec, register_quantizer, round_ste

EPS = 1e-8
PTF_K = 3
SHIFT_RULES = ("l2", "range")
#: observers whose per-group range search would break a shared base scale / own search
SEARCH_OBSERVERS = ("mse", "pct_mse")


def effective_scale(p: Params) -> Tensor:
    """Per-channel step ``s · 2^shift`` (exact: a power-of-two multiple)."""
    return torch.ldexp(p["scale"], p["shift"].round().to(torch.int32))


def integer_values(codes: Tensor, p: Params) -> tuple[Tensor, Tensor]:
    """``((q - z) << shift, s)``: the int64 values an integer kernel works on, and the base scale.

    ``x_hat == integer_values * s`` exactly up to the final float multiply. The base scale must be
    the same in every channel (it is for PTF and O-2SF).
    """
    s = p["scale"].reshape(-1)
    if not torch.all(s == s[0]):
        raise ConfigError("integer path needs one base scale shared by all channels: use a ptf or o2sf spec")
    q = codes.long() - p["zero_point"].round().long()
    return q << p["shift"].round().long(), s[0]


@dataclass(frozen=True)
class PTFOptions(Options):
    """``max_shift``: the largest power-of-two factor ``K`` (FQ-ViT: 3); ``shift_rule``: each channel's factor by
    ``l2`` (FQ-ViT's search of the quantization error) or ``range`` (the smallest that covers the channel)."""

    max_shift: int = PTF_K
    shift_rule: str = "l2"

    def validate(self) -> None:
        need(is_int(self.max_shift) and 0 <= self.max_shift <= 16,
             f"option max_shift={self.max_shift!r} must be an integer from 0 to 16")
        need(self.shift_rule in SHIFT_RULES,
             f"shift_rule {self.shift_rule!r} is unknown: use one of {', '.join(SHIFT_RULES)}")


class ShiftedUniform:
    """Asymmetric uniform codes with a per-channel power-of-two step (the PTF / O-2SF formula)."""

    name = "shifted_uniform"  # abstract: subclasses register under their own names
    param_names: tuple[str, ...] = ("scale", "zero_point", "shift")

    def _check_common(self, spec: QuantSpec) -> None:
        if spec.symmetric:
            raise ConfigError(f"{self.name} is asymmetric with a zero point: set symmetric: false")
        if not isinstance(spec.granularity, PerChannel):
            raise ConfigError(f"{self.name} needs per-channel statistics: set granularity: channel")
        if spec.observer in SEARCH_OBSERVERS:
            raise ConfigError(f"{self.name} chooses its own per-channel shifts: use observer minmax or percentile")

    def code_range(self, spec: QuantSpec) -> tuple[int, int]:
        return 0, 2 ** spec.bits - 1

    def _codes(self, x: Tensor, p: Params, spec: QuantSpec, rnd) -> Tensor:  # type: ignore[no-untyped-def]
        qmin, qmax = self.code_range(spec)
        # clamp before rounding: same codes, straight-through gradient 1 inside the range (as uniform)
        return rnd(torch.clamp(x / effective_scale(p) + p["zero_point"], qmin, qmax))

    def quantize(self, x: Tensor, p: Params, spec: QuantSpec) -> Tensor:
        return self._codes(x, p, spec, torch.round).to(torch.int32)

    def dequantize(self, codes: Tensor, p: Params, spec: QuantSpec) -> Tensor:
        return (codes.to(p["scale"].dtype) - p["zero_point"]) * effective_scale(p)

    def fake_quant(self, x: Tensor, p: Params, spec: QuantSpec) -> Tensor:
        return self.dequantize(self._codes(x, p, spec, round_ste), p, spec)

    # -- helpers shared by the initialisers -------------------------------------------------
    @staticmethod
    def _range(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
        hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
        return lo, hi

    @staticmethod
    def _base(lo_t: Tensor, hi_t: Tensor, top_shift: int, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        """Base scale ``s`` and zero point so that the step ``s 2^top_shift`` spans ``[lo_t, hi_t]``."""
        qmax = 2 ** spec.bits - 1
        top = ((hi_t - lo_t) / qmax).clamp_min(EPS)
        z = torch.clamp(torch.round(-lo_t / top), 0, qmax)
        return torch.ldexp(top, torch.tensor(-top_shift, dtype=torch.int32)), z

    @staticmethod
    def _covering_shift(lo: Tensor, hi: Tensor, s: Tensor, z: Tensor, spec: QuantSpec) -> Tensor:
        """Smallest integer ``α >= 0`` with ``[lo_c, hi_c]`` inside ``[-z, qmax - z] · s 2^α``."""
        qmax = 2 ** spec.bits - 1
        inf = torch.full_like(hi, float("inf"))
        up = torch.where(hi > 0, hi / ((qmax - z) * s), torch.zeros_like(hi))
        up = torch.where((hi > 0) & (z >= qmax), inf, up)
        down = torch.where(lo < 0, -lo / (z * s), torch.zeros_like(lo))
        down = torch.where((lo < 0) & (z <= 0), inf, down)
        need = torch.maximum(up, down).clamp_min(1.0)
        # a hair of slack: a value exactly at the range end must not cost one more shift
        return torch.ceil(torch.log2(need) - 1e-6).clamp_min(0)


class PTFQuantizer(ShiftedUniform):
    """FQ-ViT's Power-of-Two Factor quantizer (``ptf``), see the module docstring."""

    name = "ptf"
    Options = PTFOptions

    def check_spec(self, spec: QuantSpec) -> None:
        self._check_common(spec)

    def init_params(self, lo: Tensor, hi: Tensor, spec: QuantSpec) -> Params:
        """Layer-wise ``s, z`` from the per-channel ranges; ``α_c`` by the range rule (no data)."""
        k = int(spec.opts.max_shift)
        lo, hi = self._range(lo, hi)
        s, z = self._base(lo.min(), hi.max(), k, spec)
        shift = self._covering_shift(lo, hi, s, z, spec).clamp_max(k)
        return {"scale": s.expand_as(hi).clone(), "zero_point": z.expand_as(hi).clone(), "shift": shift}

    def init_from_sample(self, rows: Tensor, lo: Tensor, hi: Tensor, spec: QuantSpec) -> Params:
        """FQ-ViT's rule: per channel, the ``α ∈ {0..K}`` of least L2 error on ``rows`` (N, C)."""
        p = self.init_params(lo, hi, spec)
        if spec.opts.shift_rule == "range":
            return p
        return {**p, "shift": best_shift_per_channel(rows, p, spec, range(int(spec.opts.max_shift) + 1))}


def best_shift_per_channel(rows: Tensor, p: Params, spec: QuantSpec, shifts: "range | list[int]") -> Tensor:
    """For each column of ``rows`` (N, C) the candidate shift with the least squared error of
    :func:`vitq.quantizers.fake_quant` (the first on ties). ``p`` broadcasts against ``rows``."""
    from .base import fake_quant

    best_err = best = None
    with torch.no_grad():
        for a in shifts:
            cand = {**p, "shift": torch.full_like(p["shift"], float(a))}
            err = (fake_quant(rows, cand, spec) - rows).pow(2).mean(0)
            if best is None or best_err is None:
                best_err, best = err, cand["shift"]
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, cand["shift"], best)
    assert best is not None
    return best


register_quantizer(PTFQuantizer())

__all__ = ["PTFQuantizer", "ShiftedUniform", "best_shift_per_channel", "effective_scale", "integer_values", "PTF_K",
           "SEARCH_OBSERVERS"]
