"""Pure quantizer maths. Importing this package registers every quantizer."""

from . import (  # noqa: F401  (registration)  # noqa: F401  (registration: PTF, twin_uniform, v2sf, o2sf)
    log2,
    ptf,
    tan,  # noqa: F401  (registration: TanQ, our reconstruction)
    two_scale,
    uniform,
)
from .base import (
    QUANTIZERS,
    Params,
    QuantSpec,
    dequantize,
    fake_quant,
    get_quantizer,
    init_params,
    quantize,
    register_quantizer,
    round_ste,
)

__all__ = [
    "QUANTIZERS", "Params", "QuantSpec", "dequantize", "fake_quant", "get_quantizer", "init_params",
    "quantize", "register_quantizer", "round_ste",
]
