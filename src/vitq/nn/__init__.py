"""Thin quantizable modules over the pure quantizer maths."""

from . import int_softmax  # noqa: F401,E402  (registers the "int_exp" softmax)
from .attention import QAttention, QWindowAttention
from .blocks import SOFTMAX_IMPLS, QAdd, QBlock, QLayerNorm, QSoftmax, QSwinBlock
from .fake_quant import FakeQuant
from .modules import QConv2d, QLinear, QMatMul, QuantSlots
from .stages import calibrate, calibrate_weights, disabled, fake_quants

__all__ = [
    "SOFTMAX_IMPLS", "QAdd", "QBlock", "QLayerNorm", "QSoftmax", "QSwinBlock",
    "FakeQuant", "QAttention", "QConv2d", "QLinear", "QMatMul", "QWindowAttention", "QuantSlots",
    "calibrate", "calibrate_weights", "disabled", "fake_quants",
]
