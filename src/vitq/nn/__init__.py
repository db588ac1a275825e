"""Thin quantizable modules over the pure quantizer maths (family-neutral: adapters build on them)."""

from . import int_softmax  # noqa: F401,E402  (registers the "int_exp" softmax)
from .attention import QAttentionCore
from .blocks import SOFTMAX_IMPLS, QAdd, QLayerNorm, QSoftmax
from .fake_quant import FakeQuant
from .modules import QConv2d, QLinear, QMatMul, QuantSlots
from .stages import calibrate, calibrate_weights, disabled, fake_quants

__all__ = [
    "SOFTMAX_IMPLS", "QAdd", "QAttentionCore", "QLayerNorm", "QSoftmax",
    "FakeQuant", "QConv2d", "QLinear", "QMatMul", "QuantSlots",
    "calibrate", "calibrate_weights", "disabled", "fake_quants",
]
