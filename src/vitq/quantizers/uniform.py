"""Uniform (affine) quantizer, symmetric or asymmetric.

Asymmetric (RepQ-ViT / QDrop default; METHODS.md "Notation"):
    q = round(clamp(x / s + z, 0, 2^b - 1)),   x_hat = s * (q - z),
    s = (hi - lo) / (2^b - 1),  z = round(-lo / s)     with lo <= 0 <= hi enforced.
Symmetric (PTQ4ViT base quantizer): codes in [-2^(b-1), 2^(b-1) - 1], z = 0,
    s = max(|lo|, |hi|) / (2^(b-1) - 0.5).
Learned rounding (AdaRound, Nagel et al. 2020, eq. 22): when the parameters carry
``round_offset`` = h in [0, 1] (same shape as x), the code is ``clamp(floor(x / s) + h + z)``
instead of round-to-nearest; ``vitq.recon.adaround`` supplies h(V) during reconstruction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import NoOptions, Params, QuantSpec, clamp, register_quantizer, round_ste

EPS = 1e-8
#: optional parameter key: learned rounding offset h in [0, 1] (AdaRound), see the module docstring
ROUND_OFFSET = "round_offset"


class UniformQuantizer:
    name = "uniform"
    param_names: tuple[str, ...] = ("scale", "zero_point")
    Options = NoOptions

    def check_spec(self, spec: QuantSpec) -> None:
        pass

    def code_range(self, spec: QuantSpec) -> tuple[int, int]:
        if spec.symmetric:
            return -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
        return 0, 2 ** spec.bits - 1

    def init_params(self, lo: Tensor, hi: Tensor, spec: QuantSpec) -> Params:
        lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
        hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
        qmin, qmax = self.code_range(spec)
        if spec.symmetric:
            amax = torch.maximum(-lo, hi)
            scale = (amax / (2 ** (spec.bits - 1) - 0.5)).clamp_min(EPS)
            zp = torch.zeros_like(scale)
        else:
            scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
            zp = torch.clamp(torch.round(-lo / scale), qmin, qmax)
        return {"scale": scale, "zero_point": zp}

    def _codes(self, x: Tensor, p: Params, spec: QuantSpec, rnd) -> Tensor:  # type: ignore[no-untyped-def]
        qmin, qmax = self.code_range(spec)
        if ROUND_OFFSET in p:
            # AdaRound: no rounding here - a soft h (training) must reach the output so its gradient flows;
            # a hard h in {0, 1} gives integer codes. z is an integer, so floor(x/s) + z = floor(x/s + z).
            return clamp(torch.floor(x / p["scale"]) + p[ROUND_OFFSET] + p["zero_point"], qmin, qmax)
        # clamp before rounding: same codes (integer bounds and zero point), and the straight-through
        # gradient is 1 exactly inside the representable range, 0 outside (as in LSQ)
        return rnd(clamp(x / p["scale"] + p["zero_point"], qmin, qmax))

    def quantize(self, x: Tensor, p: Params, spec: QuantSpec) -> Tensor:
        return self._codes(x, p, spec, torch.round).to(torch.int32)

    def dequantize(self, codes: Tensor, p: Params, spec: QuantSpec) -> Tensor:
        return (codes.to(p["scale"].dtype) - p["zero_point"]) * p["scale"]

    def fake_quant(self, x: Tensor, p: Params, spec: QuantSpec) -> Tensor:
        return self.dequantize(self._codes(x, p, spec, round_ste), p, spec)


register_quantizer(UniformQuantizer())
