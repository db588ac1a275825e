"""Pure quantizer maths. Importing this package registers every quantizer."""

from . import log2, uniform  # noqa: F401  (registration)
from . import tan  # noqa: F401  (registration: TanQ, our reconstruction)
from . import ptf, two_scale  # noqa: F401  (registration: PTF, twin_uniform, v2sf, o2sf)
from .base import (
    QUANTIZERS, Params, QuantSpec, dequantize, fake_quant, get_quantizer, init_params, quantize,
    register_quantizer, round_ste,
)

__all__ = [
    "QUANTIZERS", "Params", "QuantSpec", "dequantize", "fake_quant", "get_quantizer", "init_params",
    "quantize", "register_quantizer", "round_ste",
]
