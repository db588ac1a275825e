"""Integer references for the two-scale quantizers (``twin_uniform``, ``v2sf``, ``o2sf``, ``ptf``).

* :func:`two_scale_matmul` - ``Â @ B̂`` where ``Â`` is coded by a piecewise-uniform two-scale
  quantizer (V-2SF / twin uniform) and ``B̂`` by the uniform quantizer. The codes of ``A`` are split
  into regions by their flag (:func:`vitq.quantizers.two_scale.decompose`), each region is multiplied
  with ``B``'s integers ``q_B - z_B`` in integer arithmetic, the large-region partial sum is shifted
  left by ``m`` and added to the small-region sum (TSPTQ-ViT's bit-sparsity argument, METHODS.md §3b
  [R]); one float rescale ``S_S · s_B`` at the end (plus one ``S_neg · s_B`` for a negative region
  with its own scale, V-2SF gelu ``negative: own_scale`` / twin gelu).
* :func:`integer_layernorm` - LayerNorm of PTF / O-2SF codes: the integers ``(q - z) << shift_c``
  (outlier channels shifted left), exact int64 sums ``Σx`` and ``Σx²`` for mean and variance, as
  FQ-ViT's integer LayerNorm does with PTF (``QIntLayerNorm``: ``mean = s·Σx/C``,
  ``std = (s/C)·sqrt(C·Σx² - (Σx)²)``), then the float affine. FQ-ViT's output requantization with a
  dyadic multiplier is not reproduced: the output is the float LayerNorm value.

Accumulators are int64 here (portable, exact); ``fits_int32`` in the result says whether an int32
accumulator would have sufficed for the given data.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from ..errors import ConfigError
from ..granularity import PerChannel, PerTensor
from ..quantizers.base import Params, QuantSpec
from ..quantizers.ptf import integer_values
from ..quantizers.two_scale import decompose

INT32_MAX = 2 ** 31 - 1


def shifted_integer_values(codes: Tensor, p: Params) -> tuple[Tensor, Tensor]:
    """``((q - z) << shift_c, s)`` of a PTF / O-2SF code tensor (channels last)."""
    return integer_values(codes, p)


def _uniform_ints(codes: Tensor, p: Params, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    if spec.quantizer != "uniform":
        raise ConfigError(f"two_scale_matmul needs a uniform right operand, got {spec.quantizer!r}")
    g = spec.granularity
    if not (isinstance(g, PerTensor) or (isinstance(g, PerChannel) and g.axis in (-1, codes.dim() - 1))):
        raise ConfigError("two_scale_matmul needs the right operand per-tensor or per output column: "
                          "use granularity tensor or channel")
    z = p["zero_point"].round().long()
    return codes.long() - z, p["scale"]


def _int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact integer matmul: int64 on CPU; elsewhere (no int64 GEMM on CUDA) float64, which is
    exact for the integer sums checked below 2^53."""
    if a.device.type == "cpu":
        return torch.matmul(a, b)
    bound = int(a.abs().max()) * int(b.abs().max()) * a.shape[-1]
    if bound >= 2 ** 53:
        raise ConfigError("two_scale_matmul: sums too large for the exact float64 path: run it on CPU tensors")
    return torch.matmul(a.double(), b.double()).round().long()


def two_scale_matmul(a_codes: Tensor, a_params: Params, a_spec: QuantSpec,
                     b_codes: Tensor, b_params: Params, b_spec: QuantSpec) -> dict[str, object]:
    """Integer ``Â @ B̂`` from codes. Returns ``out`` (float32), the per-scale-family integer
    accumulators ``acc`` (``{"scale": ..., "scale_neg": ...}``, int64, large regions already shifted)
    and ``fits_int32``.

    ``out == Σ_unit acc[unit] · a_params[unit] · s_B``, which equals
    ``fake_quant(A) @ fake_quant(B)`` up to float rounding.
    """
    b_int, s_b = _uniform_ints(b_codes, b_params, b_spec)
    acc: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.long))
    peak = 0
    for region, m in decompose(a_codes, a_params, a_spec):
        part = _int_matmul(m, b_int)  # one region's signed magnitudes times B's integers
        peak = max(peak, int(part.abs().max()) if part.numel() else 0)
        shift = int(region.shift.reshape(-1)[0])
        acc[region.unit] = acc[region.unit] + (part << shift)
    out = None
    for unit, a in acc.items():
        peak = max(peak, int(a.abs().max()) if a.numel() else 0)
        scale = a_params[unit].reshape(-1)[0].double() * s_b.double()
        term = a.double() * scale
        out = term if out is None else out + term
    assert out is not None
    return {"out": out.to(torch.float32), "acc": dict(acc), "fits_int32": peak <= INT32_MAX}


def integer_layernorm(codes: Tensor, p: Params, weight: Tensor, bias: Tensor,
                      eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last axis of PTF / O-2SF codes with integer statistics (see module doc)."""
    xi, s = integer_values(codes, p)
    c = xi.shape[-1]
    s1 = xi.sum(-1, keepdim=True)
    s2 = (xi * xi).sum(-1, keepdim=True)
    var_num = c * s2 - s1 * s1  # C² · Var(x_int), exact in int64
    sd = s.double()
    mean = s1.double() * sd / c
    var = var_num.double() * sd * sd / (c * c)
    y = (xi.double() * sd - mean) / torch.sqrt(var + eps)
    return (y * weight.double() + bias.double()).to(torch.float32)


__all__ = ["integer_layernorm", "shifted_integer_values", "two_scale_matmul"]
