"""Logarithmic quantizers for post-Softmax values in [0, s]: log2 and log-sqrt2.

log2 (FQ-ViT Log-Int-Softmax, METHODS.md "Notation"):
    e = round(-log2(x / s)),  x_hat = s * 2^(-e)
log-sqrt2 (RepQ-ViT):
    e = round(-2 log2(x / s)), x_hat = s * 2^(-ceil(e/2)) * (1 + (sqrt2 - 1) [e odd])

Zero handling. The papers keep 2^b powers *and* a separate zero (values with e >= 2^b are set to
0), i.e. 2^b + 1 values, which does not fit in b bits. By default we spend the top code on zero
(codes 0 .. 2^b - 2 are powers, code 2^b - 1 is exactly 0), so a b-bit quantizer really has 2^b
levels. ``options: {extra_zero: true}`` restores the papers' behaviour (for reproducing them).

Rounding domain (log2 only). By default the exponent is rounded in the log domain, ``round(-log2 r)``
with ``r = x / s`` (threshold ``√2·2^-k``). ``options: {round_domain: linear}`` is FQ-ViT's Log-Int-Softmax
arithmetic (``QIntSoftmax.forward`` / ``log_round``)::

    y = round(1 / r),  k = floor(log2 y),  e = k + [y - 2^k >= 2^(k-1)]

i.e. ``1/r`` rounded to an integer and then to the nearest power of two in the linear domain
(threshold ``1.5·2^k``, so ``r`` in ``[2^-k·2/3, 2^-k·1/√2)`` rounds up to ``2^-k``). The straight-through
gradient is that of ``-log2 r`` in both domains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from ..granularity import PerTensor
from ..options import Options, need
from .base import Params, QuantSpec, register_quantizer, round_ste

TINY = 1e-30
ROUND_DOMAINS = ("log", "linear")


@dataclass(frozen=True)
class LogOptions(Options):
    """``extra_zero``: the papers' 2^b powers plus a separate zero (2^b + 1 values) instead of the top code
    spent on zero; ``round_domain``: ``log`` (round the exponent) or ``linear`` (FQ-ViT's, log2 only)."""

    extra_zero: bool = False
    round_domain: str = "log"

    def validate(self) -> None:
        need(self.round_domain in ROUND_DOMAINS,
             f"round_domain {self.round_domain!r} is unknown: use one of {', '.join(ROUND_DOMAINS)}")


class _LogQuantizer:
    name = "log2"
    param_names: tuple[str, ...] = ("scale",)
    steps_per_octave = 1
    Options = LogOptions

    def check_spec(self, spec: QuantSpec) -> None:
        domain = spec.opts.round_domain
        if domain == "linear" and self.steps_per_octave != 1:
            allowed = ", ".join(ROUND_DOMAINS) if self.steps_per_octave == 1 else "log"
            raise ConfigError(f"{self.name} round_domain {domain!r} is unknown: use {allowed}")
        if spec.symmetric:
            raise ConfigError(f"{self.name} quantizer is for non-negative values: set symmetric: false")
        if not isinstance(spec.granularity, PerTensor):
            raise ConfigError(f"{self.name} quantizer supports per-tensor granularity only")

    def code_range(self, spec: QuantSpec) -> tuple[int, int]:
        return 0, self._n_power_codes(spec)

    def _n_power_codes(self, spec: QuantSpec) -> int:
        return 2 ** spec.bits if spec.opts.extra_zero else 2 ** spec.bits - 1

    def init_params(self, lo: Tensor, hi: Tensor, spec: QuantSpec) -> Params:
        return {"scale": hi.float().clamp_min(TINY)}

    def _exponent(self, x: Tensor, p: Params, spec: QuantSpec, rnd) -> Tensor:  # type: ignore[no-untyped-def]
        ratio = (x / p["scale"]).clamp_min(TINY)
        soft = -self.steps_per_octave * torch.log2(ratio)
        if spec.opts.round_domain != "linear":
            return rnd(soft).clamp_min(0)
        y = torch.round(1.0 / ratio).clamp_min(1.0)
        k = torch.floor(torch.log2(y))
        hard = k + ((y - torch.pow(2.0, k)) >= torch.pow(2.0, k - 1)).to(k.dtype)
        # the hard value with the gradient of ``soft``; ``rnd`` only removes the float error of the sum
        return rnd(soft + (hard - soft).detach()).clamp_min(0)

    def _codes(self, x: Tensor, p: Params, spec: QuantSpec, rnd) -> Tensor:  # type: ignore[no-untyped-def]
        e = self._exponent(x, p, spec, rnd)
        n_pow = self._n_power_codes(spec)
        zero_code = float(n_pow)  # may be 2^b with extra_zero: the papers' "b bits + zero"
        return torch.where(e >= n_pow, torch.full_like(e, zero_code), e)

    def quantize(self, x: Tensor, p: Params, spec: QuantSpec) -> Tensor:
        return self._codes(x, p, spec, torch.round).to(torch.int32)

    def _level(self, codes: Tensor) -> Tensor:
        return torch.pow(2.0, -codes)

    def dequantize(self, codes: Tensor, p: Params, spec: QuantSpec) -> Tensor:
        c = codes.to(p["scale"].dtype)
        n_pow = self._n_power_codes(spec)
        val = p["scale"] * self._level(c.clamp_max(n_pow - 1))
        return torch.where(c >= n_pow, torch.zeros_like(val), val)

    def fake_quant(self, x: Tensor, p: Params, spec: QuantSpec) -> Tensor:
        return self.dequantize(self._codes(x, p, spec, round_ste), p, spec)

    def levels(self, p: Params, spec: QuantSpec) -> Tensor:
        """All representable values, ascending."""
        n_codes = self._n_power_codes(spec) + 1
        return self.dequantize(torch.arange(n_codes), p, spec).sort().values


class Log2Quantizer(_LogQuantizer):
    name = "log2"


class LogSqrt2Quantizer(_LogQuantizer):
    name = "log_sqrt2"
    steps_per_octave = 2

    def _level(self, codes: Tensor) -> Tensor:
        odd = torch.remainder(codes, 2)
        return torch.pow(2.0, -torch.ceil(codes / 2)) * (1 + (math.sqrt(2) - 1) * odd)


register_quantizer(Log2Quantizer())
register_quantizer(LogSqrt2Quantizer())
