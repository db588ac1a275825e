"""Integer-exponent softmax (FQ-ViT's Log-Int-Softmax front end, I-BERT's ``i-exp``), registered as
the :class:`~vitq.nn.QSoftmax` implementation ``int_exp``.

FQ-ViT (METHODS.md §5, [V-code] megvii-research/FQ-ViT models/ptq/layers.py ``QIntSoftmax``),
after I-BERT (Kim et al. 2021): with the softmax input on an integer grid ``x = s·q``::

    q      <- q - max(q)                                  (so q <= 0)
    x0     = floor(-0.6931 / s)                           (-ln2 on the grid)
    q      <- max(q, n·x0),  n = 30
    k      = floor(q / x0),  r = q - x0·k                 (x = k·(-ln2) + r,  r in (-ln2, 0])
    exp(r) ≈ a·r² + b·r + c,  (a, b, c) = (0.35815147, 0.96963238, 1)
           = a·s²·(r(r + floor(b/(a s))) + floor(c/(a s²)))       (integer polynomial)
    e      = max(floor(poly · 2^(n - k)), 0)              (exp(x) ≈ e · a s² / 2^n)
    softmax = e / Σ e

and LIS then quantizes ``softmax`` with 4-bit log2 - here the ``ATTN_PROBS`` site's quantizer
(``log2``, ``options: {extra_zero: true}`` for FQ-ViT's "codes >= 2^b -> 0"), so the log2 formula
stays in :mod:`vitq.quantizers.log2`. Where the softmax input has no uniform quantizer (float
input, or calibration running), the same decomposition runs on real numbers: ``x0 = -ln2`` exactly
and no flooring of the coefficients - only the polynomial's error remains (< 0.33 % relative on
``(-ln2, 0]``).

FQ-ViT rounds ``Σe / e`` to an integer and then to a power of two in the *linear* domain (threshold
``1.5·2^k``); the log2 quantizer does so with ``options: {round_domain: linear}``, as the ``fqvit``
recipe sets, and otherwise rounds ``-log2(p)`` (threshold ``√2·2^k``). Both give 4-bit power-of-two
attention.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from .blocks import SOFTMAX_IMPLS

IEXP_COEF = (0.35815147, 0.96963238, 1.0)  # a r^2 + b r + c ~ exp(r) on (-ln2, 0]  (FQ-ViT / I-BERT)
IEXP_X0 = -0.6931  # -ln2 as FQ-ViT writes it
IEXP_N = 30  # "sufficiently large integer": inputs below n * x0 are clamped (exp < 2^-30)


def i_exp(x: Tensor, scale: "Optional[float | Tensor]" = None) -> tuple[Tensor, "float | Tensor"]:
    """``exp(x)`` for ``x <= 0`` as ``(e, s_e)`` with ``exp(x) ≈ e · s_e`` (float64 ``e``).

    ``scale`` given (a number or a one-element tensor): ``x`` is on the grid ``scale·q`` and ``e`` is
    the integer of I-BERT's i-exp; the integer constants are computed in float64 tensor ops (the
    same IEEE operations as Python floats), so a traced model keeps them as graph arithmetic.
    ``scale`` None: the same range reduction and polynomial on real numbers (``s_e = 1``).
    """
    a, b, c = IEXP_COEF
    x = x.double()
    if scale is None:
        x0 = -math.log(2.0)
        x = torch.clamp(x, min=IEXP_N * x0)
        k = torch.floor(x / x0)
        r = x - x0 * k
        return (a * r * r + b * r + c) * torch.pow(2.0, -k), 1.0
    s = torch.as_tensor(scale, dtype=torch.float64, device=x.device).reshape(())
    q = torch.round(x / s)
    x0_int = torch.floor(IEXP_X0 / s)
    q = torch.maximum(q, IEXP_N * x0_int)
    k = torch.floor(q / x0_int)
    r = q - x0_int * k
    b_int, c_int = torch.floor(b / a / s), torch.floor(c / a / s ** 2)
    poly = r * (r + b_int) + c_int
    e = torch.clamp(torch.floor(poly * torch.pow(2.0, IEXP_N - k)), min=0)
    return e, a * s * s / 2 ** IEXP_N


def int_softmax(x: Tensor, dim: int = -1, scale: "Optional[float | Tensor]" = None) -> Tensor:
    """Softmax with I-BERT's integer exponent (see the module docstring); returns ``x``'s dtype.

    Floors have no gradient: the backward pass is the float softmax's (straight-through), so
    gradient-based searches and reconstruction see through it.
    """
    e, _ = i_exp((x - x.amax(dim=dim, keepdim=True)).detach(), scale)
    out = (e / e.sum(dim=dim, keepdim=True)).to(x.dtype)
    if x.requires_grad:
        soft = x.softmax(dim=dim)
        out = soft + (out - soft).detach()
    return out


def _input_scale(input_quant: Any) -> Optional[Tensor]:
    """The step (a one-element tensor: no host sync, traceable) of a calibrated, enabled per-tensor
    uniform input quantizer, else None."""
    if input_quant is None or not input_quant.enabled or input_quant.calibrating:
        return None
    spec = input_quant.spec
    if spec.quantizer != "uniform" or not input_quant.ready or input_quant.scale.numel() != 1:
        return None
    return input_quant.scale


def _int_exp_impl(x: Tensor, dim: int, input_quant: Any = None) -> Tensor:
    return int_softmax(x, dim, _input_scale(input_quant))


_int_exp_impl.takes_input_quant = True  # type: ignore[attr-defined]
SOFTMAX_IMPLS["int_exp"] = _int_exp_impl

__all__ = ["IEXP_COEF", "IEXP_N", "IEXP_X0", "i_exp", "int_softmax"]
